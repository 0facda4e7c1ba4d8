"""Multi-sample bounds ``B(log w_1, …, log w_M)`` of the evidence, ``log w_k = log p(x, z_k) − log q(z_k)``.

One surrogate serves every such bound (IWAE, Rényi-α): the bound's own gradient through
the particles' costs (pathwise sites and ``∇ log w`` terms), and for every other site its
estimator's terms with the bound as each row's cost. What leave-one-out means under a
bound: particle ``k``'s draw replaced by the mean of the others' ``log w`` (VIMCO); what
a re-costed row means: the bound with particle ``k``'s ``log w`` recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mcgrad.inference.particles import Program, draw_particles, site_terms

Array = jax.Array
Bound = Callable[[Array], Array]  # [M] log-weights -> scalar bound


def keep_log_density(estimator) -> bool:
    """A multi-sample bound weighs each particle's ``∇ log q`` unequally, so none is dropped."""
    return False


def replace_one(bound: Bound, log_weights: Array, replacements: Array) -> Array:
    """``[M]``: the bound with ``log w_k`` replaced by ``replacements[k]``, for every ``k``."""
    num = log_weights.shape[0]
    replaced = jnp.where(jnp.eye(num, dtype=bool), replacements[:, None], log_weights[None, :])
    return jax.vmap(bound)(replaced)


def leave_one_out_bound(bound: Bound, log_weights: Array) -> Array:
    """``[M]``: the bound with each ``log w_k`` replaced by the mean of the others (VIMCO)."""
    num = log_weights.shape[0]
    return replace_one(bound, log_weights, (jnp.sum(log_weights) - log_weights) / (num - 1))


def bound_terms(
    program: Program,
    params: dict,
    states: dict,
    particles,
    layouts,
    args: tuple,
    kwargs: dict,
    bound: Bound,
) -> tuple[Array, dict, Array]:
    """``(M · site terms [M], new states, the bound)``: every site's estimator terms with the
    negative bound as each row's cost, summed over particles as the bound is."""
    num = particles.loss.shape[0]
    log_weights = jax.lax.stop_gradient(-particles.loss)
    value = bound(-particles.loss)
    cost = jnp.broadcast_to(-jax.lax.stop_gradient(value), (num,))

    def row_cost(replaced_losses):
        return -replace_one(bound, log_weights, -replaced_losses)

    terms, new_states, _ = site_terms(
        program,
        params,
        particles,
        layouts,
        states,
        args,
        kwargs,
        cost=cost,
        leave_one_out=-leave_one_out_bound(bound, log_weights),
        row_cost=row_cost,
    )
    return num * terms, new_states, value


def bound_surrogate(
    program: Program, params: dict, states: dict, key: Array, num_particles: int, args, kwargs, shard, bound: Bound
) -> tuple[Array, tuple[dict, Array]]:
    """The per-particle surrogate of ``−bound``: ``mean(s)`` is ``−B`` in value and the
    estimate in gradient."""
    particles, layouts = draw_particles(program, params, key, num_particles, args, kwargs, shard)
    terms, new_states, value = bound_terms(program, params, states, particles, layouts, args, kwargs, bound)
    return -value + terms, (new_states, jax.lax.stop_gradient(particles.loss))
