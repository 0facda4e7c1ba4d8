"""``numpyro.param`` sites: their initial values, constraints, and the map between spaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from mcgrad.inference import handlers

Params = dict[str, Any]


class ParamInfo(NamedTuple):
    """Initial unconstrained parameters and the constraint of each ``numpyro.param`` site."""

    unconstrained: Params
    constraints: dict[str, constraints.Constraint]


def _is_real(constraint) -> bool:
    return constraint is constraints.real or isinstance(constraint, type(constraints.real))


def find_params(fns: list[tuple[Callable, tuple, dict]], key: jax.Array) -> ParamInfo:
    """Trace each function once (seeded, in order, each replaying the one before) for its params."""
    unconstrained, found = {}, {}
    previous = None
    for index, (fn, args, kwargs) in enumerate(fns):
        previous = handlers.run(fn, args, kwargs, key=jax.random.fold_in(key, index), replay_trace=previous)
        for name, site in previous.items():
            if site["type"] != "param" or name in found:
                continue
            constraint = site["kwargs"].get("constraint", constraints.real)
            found[name] = constraint
            value = site["value"]
            unconstrained[name] = value if _is_real(constraint) else biject_to(constraint).inv(value)
    return ParamInfo(unconstrained, found)


def constrain(unconstrained: Params, param_constraints: dict[str, constraints.Constraint]) -> Params:
    """Map unconstrained parameters to their constrained values (as ``numpyro.param`` sees them)."""
    return {
        name: value if _is_real(param_constraints[name]) else biject_to(param_constraints[name])(value)
        for name, value in unconstrained.items()
    }
