"""Particles and data sharded over ``jax.devices()`` with ``jax.sharding``.

The same code runs on one CPU, several GPUs, or a cluster joined with
``jax.distributed``: particle keys and the leading (data) axis of model arguments are
laid out along a one-axis device mesh, and XLA partitions the compiled step.
On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"


def device_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh named ``"devices"`` over ``devices`` (default: all of them)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (AXIS,))


def particle_sharding(num_particles: int, mesh: Mesh | None = None) -> Callable[[jax.Array], jax.Array]:
    """A function placing ``[num_particles]`` keys across the mesh (identity on one device or
    when ``num_particles`` does not divide evenly)."""
    mesh = mesh if mesh is not None else device_mesh()
    if mesh.size == 1 or num_particles % mesh.size:
        return lambda keys: keys
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return lambda keys: jax.lax.with_sharding_constraint(keys, sharding)


def shard_data(tree: Any, mesh: Mesh | None = None) -> Any:
    """Put arrays whose leading axis divides evenly across the mesh there; replicate the rest.

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

    def place(leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        if leaf.ndim >= 1 and leaf.shape[0] % mesh.size == 0:
            return jax.device_put(leaf, split)
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)
