"""The one stack of NumPyro handlers every traced run of a program goes through.

Outermost first (NumPyro processes a message from the innermost handler out):

    trace ∘ draw(estimators) ∘ replay(trace) ∘ substitute(values, params) ∘ keys ∘ program

* ``keys``: ``seed`` with one key (a subsampled plate's indices then drawn as in training,
  :class:`Subsets`), or a table of keys drawn in advance (one per random site, in program
  order: :class:`SiteKeys`). Keys are taken before any value is
  substituted, so a substituted run keeps every other site's randomness (common random
  numbers for measure-valued re-runs).
* ``substitute`` / ``replay``: parameters and given values; a model replays its guide.
* ``draw``: a latent site with no value yet is drawn by its estimator's ``sample``
  (pathwise draws carry their gradient, the others do not).
* ``trace``: records the sites.

Handlers are applied inside the traced function, never around ``jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.primitives import Messenger

Array = jax.Array

_RANDOM_MESSAGES = ("sample", "prng_key", "plate", "control_flow")


def needs_key(msg: dict) -> bool:
    """Whether ``seed`` would hand ``msg`` a key (and so, whether a key table does)."""
    return msg["type"] in _RANDOM_MESSAGES and msg["kwargs"].get("rng_key") is None and msg["value"] is None


class KeyTable(NamedTuple):
    """The keys one run of a program takes, in program order.

    Attributes:
        width: how many (the width of a particle's row of keys).
        sites: the name of the sample site each key goes to (``None`` for the others).
        subsampled: ``(name, position, size, subsample_size)`` of each subsampled plate
            (the particle engine draws its minibatch once per step from that key).
    """

    width: int = 0
    sites: tuple[str | None, ...] = ()
    subsampled: tuple[tuple[str, int, int, int], ...] = ()

    def columns(self, names) -> tuple[int, ...]:
        """The positions of the keys of the sample sites in ``names``."""
        return tuple(index for index, site in enumerate(self.sites) if site in names)


class CountKeys(Messenger):
    """Records the keys a run takes (its :class:`KeyTable`)."""

    def __init__(self, fn):
        self.count, self.sites, self.subsampled = 0, [], []
        super().__init__(fn)

    def process_message(self, msg):
        if needs_key(msg):
            if msg["type"] == "plate":
                self.subsampled.append((msg["name"], self.count, *msg["args"]))
            self.sites.append(msg["name"] if msg["type"] == "sample" else None)
            self.count += 1

    @property
    def table(self) -> KeyTable:
        return KeyTable(self.count, tuple(self.sites), tuple(self.subsampled))


class SiteKeys(Messenger):
    """Gives the program's random sites keys from a row drawn in advance, in program order;
    sites past the row (a program whose structure changed) get keys split from ``spare``,
    as ``seed`` would."""

    def __init__(self, fn, keys: Array, spare: Array):
        self.keys, self.spare, self.index = keys, spare, 0
        super().__init__(fn)

    def process_message(self, msg):
        if not needs_key(msg):
            return
        if self.index < self.keys.shape[0]:
            msg["kwargs"]["rng_key"] = self.keys[self.index]
            self.index += 1
        else:
            self.spare, msg["kwargs"]["rng_key"] = jax.random.split(self.spare)


def random_subset(
    key: Array, size: int, subsample_size: int, fallback_key: Array | None = None, words: Array | None = None
) -> Array:
    """A uniformly random ``subsample_size``-subset of ``range(size)``, without replacement and
    in random order, as NumPyro's plate subsampling draws it.

    A small subset of a large set (``B ≤ 256`` and ``8B ≤ N``, a minibatch) comes from
    ``2B`` indices drawn with replacement, keeping the first ``B`` distinct ones
    (:func:`first_distinct`): 0.008 ms for 32 of 1437 on a CPU core. Otherwise, the
    positions of the largest of ``N`` i.i.d. uniforms (:func:`largest_uniforms`): 0.048 ms
    there, almost all of it drawing the ``N`` uniforms. NumPyro's own CPU path, a
    Fisher-Yates loop of ``B`` steps with a key split each, takes 0.078 ms.
    ``fallback_key``: an independent key for the first way's rare fallback, so the draws
    can take ``key`` itself (one threefry call less; by default both derive from ``key``).
    ``words``: ``[2, 2B]`` random 32-bit words for the first way's draws where
    :func:`draws_from_words` (``key`` then unused but by the fallback), taken by the caller
    from a threefry call it makes anyway: inside a compiled step each call is a loop of
    its own, and the draws' own call was a fifth of the discrete VAE's step.
    """
    if draws_distinct(size, subsample_size):
        return first_distinct(key, size, subsample_size, 2 * subsample_size, fallback_key, words)
    return largest_uniforms(key, size, subsample_size)


def draws_distinct(size: int, subsample_size: int) -> bool:
    """Whether :func:`random_subset` takes the first way (:func:`first_distinct`): a small
    subset (``B ≤ 256``) of a set at least ``8B`` large."""
    return subsample_size <= 256 and 8 * subsample_size <= size


def draws_from_words(size: int, subsample_size: int) -> bool:
    """Whether :func:`random_subset` of ``subsample_size`` of ``size`` takes its draws from
    ``2 · subsample_size`` pairs of given words (the first way, with ``size < 2¹⁶`` so
    that :func:`indices_from_words`' arithmetic stays in 32 bits)."""
    return draws_distinct(size, subsample_size) and size < 2**16


def largest_uniforms(key: Array, size: int, subsample_size: int) -> Array:
    """The positions of the ``subsample_size`` largest of ``size`` i.i.d. uniforms."""
    return jax.lax.top_k(jax.random.uniform(key, (size,)), subsample_size)[1]


def uniform_indices(key: Array, size: int, num_draws: int) -> Array:
    """``num_draws`` i.i.d. uniform indices in ``range(size)`` from one call of the key's bit
    generator: two 32-bit words per index combined as ``jax.random.randint`` combines them
    (``(hi mod N)·(2³² mod N)² + lo mod N``, mod ``N``; bias below ``N²/2⁶⁴``), without its
    key split and second bit draw (on CPU each call of threefry is a loop)."""
    if size >= 2**16:
        return jax.random.randint(key, (num_draws,), 0, size)
    return indices_from_words(jax.random.bits(key, (2, num_draws), jnp.uint32), size)


def indices_from_words(words: Array, size: int) -> Array:
    """``[n]`` uniform indices in ``range(size)`` (``size < 2¹⁶``) from ``[2, n]`` random
    32-bit words, as :func:`uniform_indices` combines them."""
    high, low = words
    span = jnp.uint32(size)
    multiplier = jnp.uint32((2**32 % size) ** 2 % size)
    return (((high % span) * multiplier + low % span) % span).astype(jnp.int32)


def first_distinct(
    key: Array, size: int, subsample_size: int, num_draws: int, fallback_key: Array | None = None,
    words: Array | None = None,
) -> Array:
    """The first ``subsample_size`` distinct of ``num_draws`` indices drawn uniformly with
    replacement, in draw order.

    Drawing with replacement and skipping repeats makes every ordered subset equally
    likely, so the result is exact. In the rare case of fewer distinct draws than needed
    (for 64 draws of 1437, 33 repeats), :func:`largest_uniforms` from a fresh key stands
    in, which keeps it exact. Its key is ``fallback_key``, independent of ``key``; without
    one, the draws and the fallback take ``fold_in(key, 0)`` and ``fold_in(key, 1)``
    (drawing from ``key`` itself would share threefry counters with ``fold_in(key, 1)``).
    Given ``[2, num_draws]`` random ``words`` (:func:`draws_from_words`), the draws are theirs.
    """
    if words is not None:
        draws = indices_from_words(words, size)
    else:
        draws = uniform_indices(key if fallback_key is not None else jax.random.fold_in(key, 0), size, num_draws)
    repeat = jnp.any(jnp.tril(draws[:, None] == draws[None, :], k=-1), axis=1)
    position = jnp.cumsum(~repeat) - 1
    slot = jnp.where(~repeat & (position < subsample_size), position, subsample_size)  # out of range: dropped
    subset = jnp.zeros((subsample_size,), draws.dtype).at[slot].set(draws, mode="drop")
    return jax.lax.cond(
        position[-1] + 1 >= subsample_size,
        lambda: subset,
        lambda: largest_uniforms(
            fallback_key if fallback_key is not None else jax.random.fold_in(key, 1), size, subsample_size
        ).astype(draws.dtype),
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compiled_subset(key: Array, size: int, subsample_size: int) -> Array:
    return random_subset(key, size, subsample_size)


class Subsets(Messenger):
    """Draws a subsampled plate's indices with :func:`random_subset`, compiled once per
    shape, in place of NumPyro's: on CPU it runs a ``lax.scan`` over a function made afresh
    at each call, so every eager trace of a subsampled program compiled it again (0.5 s
    for the discrete VAE's guide, at each ``mg.fit`` call's first trace)."""

    def process_message(self, msg):
        if msg["type"] == "plate" and msg["value"] is None:
            msg["fn"] = lambda size, subsample_size, rng_key: _compiled_subset(rng_key, size, subsample_size)


class Draw(Messenger):
    """Draws each latent site that has no value yet with its estimator's ``sample`` (or,
    where its estimator pairs draws, with its ``partner``: the pair's member this particle is,
    one draw from the key)."""

    def __init__(self, fn, estimators: dict[str, Any], partner: Array | None = None):
        self.estimators, self.partner = estimators, partner
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        estimator = self.estimators.get(msg["name"])
        if estimator is not None:
            key, shape = msg["kwargs"]["rng_key"], tuple(msg["kwargs"].get("sample_shape", ()))
            if estimator.partner is not None and self.partner is not None:
                msg["value"] = estimator.partner(key, msg["fn"], shape, self.partner)
            else:
                msg["value"] = estimator.sample(key, msg["fn"], shape)


def run(
    fn: Callable,
    args: tuple,
    kwargs: dict,
    *,
    key: Array | None = None,
    site_keys: tuple[Array, Array] | None = None,
    params: dict | None = None,
    values: dict | None = None,
    replay_trace: dict | None = None,
    estimators: dict | None = None,
    partner: Array | None = None,
    count_keys: bool = False,
) -> dict | tuple[dict, KeyTable]:
    """One traced run of ``fn(*args, **kwargs)`` through the documented stack.

    Args:
        key: seed the run with this key; or
        site_keys: ``(keys, spare)``, a key table (:class:`SiteKeys`).
        params, values: substituted (``values`` win over ``params``).
        replay_trace: a trace whose sample sites the run replays (a model given its guide).
        estimators: site name -> estimator; each draws its site's value.
        partner: whether this run is a partner particle (a boolean, traced or not): sites
            whose estimator pairs its draws take the ``partner`` draw.
        count_keys: also return the run's :class:`KeyTable`.

    Returns:
        The trace (an ordered dict of sites), and the key table with ``count_keys``.
    """
    counter = CountKeys(fn) if count_keys else None
    program = counter if counter is not None else fn
    if site_keys is not None:
        program = SiteKeys(program, *site_keys)
    elif key is not None:
        program = Subsets(handlers.seed(program, key))
    data = {**(params or {}), **(values or {})}
    if data:
        program = handlers.substitute(program, data=data)
    if replay_trace is not None:
        program = handlers.replay(program, trace=replay_trace)
    if estimators:
        program = Draw(program, estimators, partner)
    trace = handlers.trace(program).get_trace(*args, **kwargs)
    return (trace, counter.table) if count_keys else trace
