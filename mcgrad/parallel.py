"""Particles and data sharded over ``jax.devices()`` with ``jax.sharding``.

The same code runs on one CPU, several GPUs, or a cluster of processes joined with
``jax.distributed``: particle keys and the leading (data) axis of model arguments are
laid out along a one-axis device mesh, and XLA partitions the compiled step.
On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four devices.

Several processes (one per host, multi-controller JAX) join with JAX's own
``jax.distributed.initialize(...)``, called first in every process; mcgrad does not wrap
it. After it, ``jax.devices()`` lists the devices of every process, so
:func:`device_mesh` spans the cluster, and every process runs the same ``mg.fit`` call.
Data reaches the global mesh in one of two ways:

* a host array (NumPy, or a JAX array on one of this process's devices) is the **whole
  data set**, the same on every process (JAX checks that it is); :func:`shard_data` keeps
  each process's part of it. Simple, but every process loads all of it.
* :func:`from_process_local` joins each process's **own rows** into one global
  ``jax.Array`` (rows in process order); :func:`shard_data` and ``mg.fit`` leave such an
  array alone. Each process loads only its share.

Every process gets the same :class:`~mcgrad.FitResult` back; its arrays may span other
processes' devices, and :func:`to_host` reads them whole on every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"


def device_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh named ``"devices"`` over ``devices`` (default: all of them, those
    of every process after ``jax.distributed.initialize``)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (AXIS,))


def particle_sharding(num_particles: int, mesh: Mesh | None = None) -> Callable[[jax.Array], jax.Array]:
    """A function placing ``[num_particles]`` keys across the mesh (identity on one device or
    when ``num_particles`` does not divide evenly)."""
    mesh = mesh if mesh is not None else device_mesh()
    if mesh.size == 1 or num_particles % mesh.size:
        return lambda keys: keys
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return lambda keys: jax.lax.with_sharding_constraint(keys, sharding)


def _is_laid_out(leaf: Any, mesh: Mesh) -> bool:
    """A ``jax.Array`` already spread over exactly the mesh's devices (by the user, or by
    :func:`from_process_local`): its layout is kept."""
    return isinstance(leaf, jax.Array) and leaf.sharding.device_set == set(mesh.devices.flat)


def shard_data(tree: Any, mesh: Mesh | None = None) -> Any:
    """Put arrays whose leading axis divides evenly across the mesh there; replicate the rest.

    Arrays already laid out over the mesh's devices (e.g. from :func:`from_process_local`)
    are left as they are. With several processes, every other array is taken as the whole
    data set, the same on every process (``jax.device_put`` checks it, across processes),
    and each process keeps its own devices' part; non-array leaves pass through.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> x = mg.parallel.shard_data(jnp.ones((8, 3)))
        >>> x.shape
        (8, 3)
    """
    mesh = mesh if mesh is not None else device_mesh()
    if mesh.size == 1:
        return tree
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    many_processes = jax.process_count() > 1

    def place(leaf):
        if not hasattr(leaf, "shape") or _is_laid_out(leaf, mesh):
            return leaf
        if many_processes and isinstance(leaf, jax.Array):
            # A committed single-device array cannot go to other processes' devices
            # directly; its host copy can (every process holds the same value).
            leaf = np.asarray(leaf)
        if leaf.ndim >= 1 and leaf.shape[0] % mesh.size == 0:
            return jax.device_put(leaf, split)
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)


def from_process_local(tree: Any, mesh: Mesh | None = None) -> Any:
    """Join every process's own rows into global arrays sharded along their leading axis.

    Each process passes its local part (the same structure, shapes and dtypes on every
    process); an array leaf of shape ``[n, ...]`` becomes one global ``jax.Array`` of shape
    ``[n · num_processes, ...]`` whose rows are process 0's, then process 1's, …, split over
    the mesh (each process's rows stay on its own devices: nothing is copied between
    hosts). Scalars (0-d) and non-array leaves are taken as the same on every process and
    replicated. ``mg.fit`` and :func:`shard_data` keep these arrays as they are. With one
    process this is :func:`shard_data` with a check that the rows divide evenly.

    Wraps ``jax.make_array_from_process_local_data``; requires ``n`` to be a multiple of
    ``jax.local_device_count()``.

    Args:
        tree: a pytree of this process's rows (NumPy or JAX arrays).
        mesh: default :func:`device_mesh` (all devices of all processes).

    Returns:
        The same pytree of global ``jax.Array``.

    Example:
        >>> import numpy as np, jax, mcgrad as mg
        >>> rows = np.arange(4.0 * jax.local_device_count())   # this process's rows
        >>> x = mg.parallel.from_process_local(rows)
        >>> x.shape == (rows.shape[0] * jax.process_count(),)
        True
    """
    mesh = mesh if mesh is not None else device_mesh()
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    local_devices = len(split.addressable_devices)

    def place(leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        leaf = np.asarray(leaf)
        if leaf.ndim == 0:
            return jax.make_array_from_process_local_data(replicated, leaf)
        if leaf.shape[0] % local_devices:
            raise ValueError(
                f"from_process_local: this process has {leaf.shape[0]} rows (shape {leaf.shape}), "
                f"which do not divide evenly over its {local_devices} devices; give every process "
                f"a multiple of {local_devices} rows (pad, or drop the remainder)."
            )
        global_shape = (leaf.shape[0] * mesh.size // local_devices, *leaf.shape[1:])
        return jax.make_array_from_process_local_data(split, leaf, global_shape)

    return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` whole, as NumPy, on every process.

    A global array that spans other processes' devices (a multi-process ``mg.fit``'s
    parameters, or data from :func:`from_process_local`) is gathered with
    ``jax.experimental.multihost_utils.process_allgather``; one this process holds whole
    (NumPy, a single-process result, ``result.losses``) is only converted. Gathering is a
    collective: with several processes, call it on every one of them.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg
        >>> mg.parallel.to_host({"loc": jnp.float32(0.5), "n": 3})
        {'loc': array(0.5, dtype=float32), 'n': 3}
    """
    from jax.experimental import multihost_utils

    def gather(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(leaf) if hasattr(leaf, "shape") else leaf

    return jax.tree.map(gather, tree)
