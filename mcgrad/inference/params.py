"""``numpyro.param`` sites: their initial values, constraints, and the map between spaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.primitives import Messenger

from mcgrad.inference import handlers

Params = dict[str, Any]


class ParamInfo(NamedTuple):
    """Initial unconstrained parameters and the constraint of each ``numpyro.param`` site."""

    unconstrained: Params
    constraints: dict[str, constraints.Constraint]


def _is_real(constraint) -> bool:
    return constraint is constraints.real or isinstance(constraint, type(constraints.real))


def _initial_value_error(name: str, value, problem: str) -> ValueError:
    value = np.asarray(value)
    shown = f"{value.item()!r}" if value.size == 1 else f"shape {value.shape}"
    return ValueError(f"numpyro.param('{name}'): its initial value ({shown}) {problem}.")


_OUTSIDE = ("lies outside its constraint {} or on its boundary, where its unconstrained value is not finite; "
            "give an initial value strictly inside it")


class CheckInitialValues(Messenger):
    """Raise a clear error at a ``numpyro.param`` whose initial value cannot be fitted, as the
    site is reached (before a distribution built from it refuses it with a message that
    names neither): an integer value (no gradient), a value that is not finite, or one
    outside its elementwise constraint (``-1`` for ``constraints.positive``). Values on a
    constraint's boundary are caught by :func:`find_params`. Traced values (inside
    ``jit``) are not checked; the checks run on the host, a few microseconds a param."""

    def postprocess_message(self, msg):
        if msg["type"] != "param" or msg["value"] is None:
            return
        leaves = jax.tree.leaves(msg["value"])
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return
        name, constraint = msg["name"], msg["kwargs"].get("constraint", constraints.real)
        for leaf in leaves:
            host = np.asarray(leaf)
            if not np.issubdtype(host.dtype, np.inexact):
                raise _initial_value_error(name, host, f"is an integer array ({host.dtype}), which has no gradient; "
                                                       "give a float (e.g. 0.0, not 0)")
            if not np.all(np.isfinite(host)):
                raise _initial_value_error(name, host, "is not finite (NaN or ±inf); give a finite initial value")
        single = len(leaves) == 1 and leaves[0] is msg["value"]  # an array, not a module's pytree
        if single and not _is_real(constraint) and constraint.event_dim == 0 and not np.all(constraint(leaves[0])):
            raise _initial_value_error(name, leaves[0], _OUTSIDE.format(constraint))


def find_params(fns: list[tuple[Callable, tuple, dict]], key: jax.Array) -> ParamInfo:
    """Trace each function once (seeded, in order, each replaying the one before) for its
    params, checking their initial values (:class:`CheckInitialValues`, and here that a
    constrained one maps to a finite unconstrained value)."""
    unconstrained, found = {}, {}
    previous = None
    for index, (fn, args, kwargs) in enumerate(fns):
        previous = handlers.run(CheckInitialValues(fn), args, kwargs, key=jax.random.fold_in(key, index),
                                replay_trace=previous)
        for name, site in previous.items():
            if site["type"] != "param" or name in found:
                continue
            constraint = site["kwargs"].get("constraint", constraints.real)
            found[name] = constraint
            value = site["value"]
            if _is_real(constraint):
                unconstrained[name] = value
                continue
            unconstrained[name] = biject_to(constraint).inv(value)
            free = unconstrained[name]
            if not isinstance(free, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(free))):
                raise _initial_value_error(name, value, _OUTSIDE.format(constraint))
    return ParamInfo(unconstrained, found)


def constrain(unconstrained: Params, param_constraints: dict[str, constraints.Constraint]) -> Params:
    """Map unconstrained parameters to their constrained values (as ``numpyro.param`` sees them)."""
    return {
        name: value if _is_real(param_constraints[name]) else biject_to(param_constraints[name])(value)
        for name, value in unconstrained.items()
    }
