"""Cost terms of a trace: log-densities with their plates and their place in the program."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from mcgrad.estimators.distributions import describe
from mcgrad.estimators.log_prob import log_prob

Array = jax.Array
Plates = tuple[tuple[str, int], ...]


class Term(NamedTuple):
    """One cost term: a log-density array (scaled, masked), its plates and program position.

    ``order`` is the index of the program site it belongs to (cost terms outside the
    program, such as the model's, come after every program site: ``inf``).
    """

    value: Array
    plates: Plates
    order: float


def latent_sites(trace: dict) -> list[dict]:
    """The sample sites of a trace that are not observed, in program order."""
    return [s for s in trace.values() if s["type"] == "sample" and not s["is_observed"]]


def site_plates(site: dict) -> Plates:
    """``(name, dim)`` of every plate the site sits in."""
    return tuple((frame.name, frame.dim) for frame in site["cond_indep_stack"] if frame.dim is not None)


def site_log_prob(
    site: dict, scaled: bool = True, fn: dist.Distribution | None = None, own_sample: bool = False
) -> Array:
    """``log p(value)`` of a sample site with its mask (and its plate scale if ``scaled``).

    The log-density's gradient is right at NumPyro's kinks (:mod:`mcgrad.estimators.log_prob`).
    Masked-out entries (missing data, NaN say) count ``0`` and never reach a gradient: a
    mask on the distribution (``numpyro.handlers.mask`` and ``dist.mask`` wrap it in a
    ``MaskedDistribution``) is replayed by ``log_prob``, and a mask on the site itself has
    its entries replaced by a feasible value before ``log_prob`` (``where(mask, log p, 0)``
    alone has gradient ``0 · ∇ log p(NaN) = NaN``).
    ``own_sample``: the value was drawn from the site's own distribution (or a weak
    derivative of it), so it is in the support and NumPyro's support check is skipped.
    """
    fn = fn if fn is not None else site["fn"]
    mask = site.get("mask")
    value = site["value"] if mask is None else feasible_where_masked(fn, site["value"], mask)
    with numpyro.validation_enabled(False) if own_sample else contextlib.nullcontext():
        value = log_prob(fn, value)
    if mask is not None:
        value = jnp.where(*jnp.broadcast_arrays(mask, value, 0.0))
    if scaled and site.get("scale") is not None:
        value = site["scale"] * value
    return value


def feasible_where_masked(fn: dist.Distribution, value: Array, mask: Array) -> Array:
    """``value`` with its masked-out entries (``mask`` ``False``, over the batch
    dimensions) replaced by a feasible value of ``fn``'s support, as NumPyro's
    ``MaskedDistribution.log_prob`` does; unchanged where the support has no feasible value."""
    try:
        with jax.numpy_rank_promotion("allow"):
            default = fn.support.feasible_like(value)
    except NotImplementedError:
        return value
    value_mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * fn.event_dim)
    return jnp.where(*jnp.broadcast_arrays(value_mask, value, default))


def reduce_to_plates(term: Term, plates: Plates, shape: tuple[int, ...]) -> Array:
    """Sum ``term`` over every axis but the plates it shares with a site of log-prob ``shape``."""
    value = jnp.asarray(term.value)
    shared = [dim for name, dim in plates if (name, dim) in term.plates and -dim <= len(shape)]
    keep = sorted(value.ndim + dim for dim in shared if -dim <= value.ndim and value.shape[dim] > 1)
    summed = jnp.sum(value, axis=tuple(a for a in range(value.ndim) if a not in keep))
    target = [1] * len(shape)
    for axis in keep:
        target[len(shape) + axis - value.ndim] = value.shape[axis]
    return jnp.broadcast_to(jnp.reshape(summed, target), shape)


def total(terms: list[Term]) -> Array:
    """The sum of every term: a particle's cost."""
    return sum((jnp.sum(t.value) for t in terms), jnp.zeros(()))


def describe_site(site: dict) -> str:
    """``'name' (Family)`` for error messages."""
    return f"'{site['name']}' ({describe(site['fn'])})"
