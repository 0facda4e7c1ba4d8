"""Checks of a traced program before it is fitted: its data and its shapes.

Run once, at setup, on the trace of the model with its example arguments. (NumPyro's
``SVI`` sets an objective up inside ``jit``: concrete values are still checked there,
and values that are tracers are skipped.)

* :func:`check_observations`: an observed value that is not finite (NaN, ±inf) where the
  model does not mask it is an error naming the site and the argument it came from.
  Entries masked with ``numpyro.handlers.mask`` (or ``dist.mask``, or ``obs_mask``) may
  hold anything: their log-density is ``0`` and the value is replaced by a feasible one
  before ``log_prob``, so it never reaches a gradient.
* :func:`check_observed_shapes`: an observed value whose shape does not broadcast against
  its distribution is an error naming the site and both shapes.
* :func:`warn_missing_plates`, :func:`warn_guide_only_sites`: NumPyro's warnings for a
  model and guide (a missing ``plate`` for a batch dimension, a guide site that is not in
  the model), shown once, at the user's line.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.util import _validate_model

from mcgrad.estimators.distributions import describe

_INTERNAL = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (sys.modules["mcgrad"], numpyro, jax)
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside mcgrad, NumPyro and JAX, for a
    ``warnings.warn`` called by this function's caller."""
    frame, level = sys._getframe(2), 2  # the frame of stacklevel=2: the caller's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def check_observed_shapes(model_trace: dict) -> None:
    """Raise a clear error for an observed value whose shape does not broadcast against its
    distribution's ``batch_shape + event_shape`` (a plate or ``expand`` of another size
    than the data), naming the site and both shapes. NumPyro's own check stops at
    ``Incompatible shapes for broadcasting``."""
    for name, site in model_trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn, value_shape = site["fn"], jnp.shape(site["value"])
        expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
        try:
            jnp.broadcast_shapes(value_shape, expected)
        except ValueError:
            raise ValueError(
                f"observed site '{name}' ({describe(fn)}): the observed value has shape {value_shape}, which does "
                f"not broadcast against the distribution's shape {expected} (batch {tuple(fn.batch_shape)}, event "
                f"{tuple(fn.event_shape)}). Size the site's plate or expand() from the data, e.g. "
                f"numpyro.plate('data', x.shape[0])."
            ) from None


def warn_missing_plates(model_trace: dict) -> None:
    """NumPyro's warning for a site with a batch dimension no plate declares.

    E.g. data of shape ``[4, 1]`` under ``plate("data", 4)`` broadcasts against the
    distribution's ``[4]`` to ``[4, 4]``: sixteen observations instead of four. NumPyro's
    ``Trace_ELBO`` warns ``Missing a plate statement for batch dimension -2 at site 'x'``
    (its ``numpyro.util._validate_model``, run here); so does mcgrad, once, at setup, at the
    user's line.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _validate_model(model_trace, plate_warning="loose")
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=_user_stacklevel())


def warn_guide_only_sites(model_trace: dict, guide_trace: dict) -> None:
    """NumPyro's warnings (``numpyro.util.check_model_guide_match``, same messages) for a
    guide sample site that is not in the model and not marked auxiliary, and for an
    auxiliary site in the model.

    Not its error for event dimensions that disagree: mcgrad estimates a guide site that
    is ``to_event`` where the model's is a plate of the same values.
    """
    guide_sites = {n for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    auxiliary = {n for n in guide_sites if guide_trace[n]["infer"].get("is_auxiliary")}
    model_sites = {n for n, s in model_trace.items() if s["type"] == "sample" and not s["is_observed"]}
    if auxiliary & model_sites:
        warnings.warn(f"Found auxiliary vars in the model: {auxiliary & model_sites}", stacklevel=_user_stacklevel())
    if guide_sites - auxiliary - model_sites:
        warnings.warn(
            "Found non-auxiliary vars in guide but not model, consider marking these "
            f"infer={{'is_auxiliary': True}}:\n{guide_sites - auxiliary - model_sites}",
            stacklevel=_user_stacklevel(),
        )


# --------------------------------------------------------------------------- data
#
# Arrays are reduced with jax.numpy, never read whole with np.asarray: a model argument
# may be a global array spanning other processes' devices (multi-process fits), which no
# process can read, while a reduction of it gives every process the same scalar.


def count(predicate: Callable[[jax.Array], jax.Array], array) -> int:
    """How many entries of ``array`` satisfy ``predicate`` (one reduction, on any concrete
    array, also while a function is being traced)."""
    with jax.ensure_compile_time_eval():
        return int(jnp.sum(predicate(jnp.asarray(array))))


def is_floating(array) -> bool:
    return hasattr(array, "dtype") and jnp.issubdtype(array.dtype, jnp.floating)


def _with_trailing_ones(mask, num_ones: int):
    mask = jnp.asarray(mask)
    return jnp.reshape(mask, mask.shape + (1,) * num_ones)


def observation_mask(distribution: dist.Distribution) -> tuple[jax.Array | bool, int]:
    """``(mask, event_dim)``: which entries of a value the distribution scores.

    ``mask`` (an array or ``True``) broadcasts against ``value.shape[:ndim - event_dim]``;
    an entry where it is ``False`` has log-density ``0`` whatever the value there. Masks
    of ``MaskedDistribution`` (what ``numpyro.handlers.mask``, ``dist.mask`` and
    ``obs_mask`` make) are found through ``Independent`` and ``expand`` wrappers.
    """
    if isinstance(distribution, dist.MaskedDistribution):
        inner, inner_event_dim = observation_mask(distribution.base_dist)
        own, event_dim = distribution._mask, distribution.base_dist.event_dim  # own: over base's batch
        if own is True:
            return inner, inner_event_dim
        if inner is True:
            return jnp.asarray(own), event_dim
        # An inner mask sits at a finer level (event dimensions only grow outwards).
        own = _with_trailing_ones(own, event_dim - inner_event_dim)
        return jnp.logical_and(*jnp.broadcast_arrays(own, inner)), inner_event_dim
    if isinstance(distribution, (dist.Independent, dist.ExpandedDistribution)):
        return observation_mask(distribution.base_dist)
    return True, distribution.event_dim


def _is_tracer(x) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def argument_label(value: jax.Array, args: tuple, kwargs: dict) -> str:
    """Which model argument ``value`` is, for error messages (``"argument 0"``,
    ``"keyword 'y'"``), or a description when it is none of them as it is (a slice, a
    transformation)."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword '{k}'", v) for k, v in kwargs.items()]
    for label, argument in named:
        for path, leaf in jax.tree_util.tree_flatten_with_path(argument)[0]:
            if _is_tracer(leaf) or not hasattr(leaf, "shape") or jnp.shape(leaf) != jnp.shape(value):
                continue
            if bool(jnp.array_equal(leaf, value, equal_nan=True)):
                return label + jax.tree_util.keystr(path)
    return "a model argument (the site's value is derived from it: a slice or a transformation)"


def check_observations(model_trace: dict, args: tuple, kwargs: dict) -> None:
    """Raise a clear error for an observed value that is not finite where it is not masked.

    Masked entries (``numpyro.handlers.mask(mask=...)``, ``dist.mask``, ``obs_mask``) may
    be NaN: that is how missing data is written. Anywhere else a NaN or ±inf would make
    every log-density, and so every step, non-finite.
    """
    with jax.ensure_compile_time_eval():  # concrete data inside a trace (NumPyro's SVI): eager
        for name, site in model_trace.items():
            if site["type"] == "sample" and site["is_observed"]:
                _check_observed_site(name, site, args, kwargs)


def _check_observed_site(name: str, site: dict, args: tuple, kwargs: dict) -> None:
    """Raise for non-finite entries of one observed site's value that its masks score."""
    value = site["value"]
    if _is_tracer(value) or (not is_floating(value) and not isinstance(value, float)):
        return  # a tracer: traced inside jit (NumPyro's SVI), checked at setup instead
    value = jnp.asarray(value)
    if not count(lambda v: ~jnp.isfinite(v), value):
        return
    mask, event_dim = observation_mask(site["fn"])
    if site.get("mask") is not None:  # a mask on the site itself (older NumPyro handlers)
        site_mask = _with_trailing_ones(site["mask"], max(site["fn"].event_dim - event_dim, 0))
        mask = site_mask if mask is True else jnp.logical_and(*jnp.broadcast_arrays(mask, site_mask))
    if _is_tracer(mask):
        return
    nonfinite = ~jnp.isfinite(value)
    if event_dim:
        nonfinite = jnp.any(nonfinite, axis=tuple(range(-min(event_dim, value.ndim), 0)))
    if mask is not True:
        nonfinite, mask = jnp.broadcast_arrays(nonfinite, mask)
        nonfinite = nonfinite & mask  # scored entries only
    num_bad = count(lambda v: v, nonfinite)
    if num_bad:
        kinds = "NaN or infinite" if count(jnp.isinf, value) else "NaN"
        raise ValueError(
            f"observed site '{name}' ({describe(site['fn'])}) has {num_bad} {kinds} values where the "
            f"model does not mask them (value shape {value.shape}, from "
            f"{argument_label(value, args, kwargs)}). Impute or drop them before fitting, or mask "
            f"them in the model: `with numpyro.handlers.mask(mask=~jnp.isnan(x)): "
            f"numpyro.sample('{name}', ..., obs=x)` (masked entries may stay NaN)."
        )
