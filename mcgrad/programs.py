"""Compiled programs kept across calls: a fingerprint of what built them, and a bounded cache.

``mg.fit`` keeps its training programs here (``mg.fit.cache``) and the auto driver its
measurement programs, so a second fit of the same model, guide, objective and argument
shapes reuses the first's compiled program.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def fingerprint(value: Any, seen: dict | None = None, depth: int = 0) -> Any:
    """A hashable description of ``value`` by structure and content: functions by their code,
    defaults, closure cells and the globals they name; containers by their items; arrays by
    shape, dtype and bytes; a library's module-level function (:data:`LIBRARIES`) by its
    name and identity. Two ``optax.adam(1e-2)`` built apart, or two ``mg.elbo(4)``, get
    the same fingerprint; another learning rate or particle count does not. What it cannot
    describe (objects, deep structures) it names by identity, which can only cost a
    recompile, never reuse a program that does something else."""
    seen = {} if seen is None else seen
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None))):
        return (type(value).__name__, value)
    if id(value) in seen:  # met before in this walk: its place in the walk, not its address
        return ("same", seen[id(value)][0])
    if depth > 12:
        return ("deep", id(value))
    if isinstance(value, (np.ndarray, np.generic)) or (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)):
        if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        array = np.asarray(value)
        return ("array", array.shape, str(array.dtype), array.tobytes() if array.size <= 4096 else hash(array.tobytes()))
    seen[id(value)] = (len(seen), value)  # kept alive while fingerprinting, so ids stay unique
    if isinstance(value, (tuple, list)):
        return (type(value).__qualname__, tuple(fingerprint(v, seen, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), fingerprint(v, seen, depth + 1)) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return ("partial", fingerprint((value.func, value.args, value.keywords), seen, depth + 1))
    if isinstance(value, types.FunctionType) and _library_function(value):
        return ("library function", value.__module__, value.__qualname__, id(value))
    if isinstance(value, types.FunctionType):
        code = value.__code__
        cells = tuple(fingerprint(c.cell_contents, seen, depth + 1) if cell_filled(c) else None for c in value.__closure__ or ())
        names = tuple(
            (name, fingerprint(value.__globals__[name], seen, depth + 1))
            for name in code.co_names
            if name in value.__globals__ and not isinstance(value.__globals__[name], types.ModuleType)
        )
        return ("function", code, fingerprint(value.__defaults__, seen, depth + 1), cells, names)
    if isinstance(value, types.MethodType):
        return ("method", fingerprint(value.__func__, seen, depth + 1), fingerprint(value.__self__, seen, depth + 1))
    if isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)):
        return ("named", id(value))
    if isinstance(value, eqx.Module) or dataclasses.is_dataclass(value):
        leaves, treedef = jax.tree.flatten(value)
        return ("pytree", str(treedef), tuple(fingerprint(v, seen, depth + 1) for v in leaves))
    if hasattr(value, "__dict__"):  # an object: its class and its attributes, so a mutation shows
        return ("object", type(value).__qualname__, id(type(value)), fingerprint(vars(value), seen, depth + 1))
    return ("object", id(value))


# Packages whose module-level functions are named, not walked: their code does not change
# within a process, and walking them (the globals they name, and theirs) was most of a
# fingerprint's time (5 ms for an objective and two estimators; a fit's every call and the
# auto driver's every candidate take one).
LIBRARIES = frozenset({"mcgrad", "numpyro", "jax", "jaxlib", "optax", "equinox", "numpy", "scipy", "flax"})


def _library_function(function: types.FunctionType) -> bool:
    """A module-level function of one of :data:`LIBRARIES` (a closure, ``<locals>``, is walked)."""
    module = getattr(function, "__module__", None) or ""
    return module.split(".")[0] in LIBRARIES and "<locals>" not in function.__qualname__


def compiler_options() -> dict[str, Any]:
    """XLA options for the programs ``mg.fit`` and the auto driver compile.

    On CPU, LLVM optimization level 1 instead of XLA's default 2: about a third less
    compile time for the same per-step time within noise (BLR: 1.11 s against 1.73 s
    to compile 2000 steps, 0.267 against 0.273 ms/step; the discrete VAE: 1.69 s
    against 2.49 s, 0.301 against 0.300 ms/step with level 2 set explicitly). Compiling is
    most of what a user waits for in a fit of a few thousand steps. It is not free for a
    compute-heavy step: BLR with measure-valued gradients (124 re-runs per particle) runs
    10–13% slower at level 1, with no compile saving. Other backends keep XLA's defaults.
    """
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}


# The event mcgrad records for a program's one-time work that JAX's events do not cover:
# a :class:`ProgramCache` build (a trainer: NumPyro traces the model and guide eagerly),
# and the auto driver's lowering, compiling, first run and timing of a measurement
# program. With JAX's own events for tracing, lowering and compiling: everything a
# process pays once a program.
SETUP_EVENT = "/mcgrad/program_setup"
COMPILE_EVENTS = frozenset({  # JAX's
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})
ONE_TIME_EVENTS = COMPILE_EVENTS | {SETUP_EVENT}


@contextlib.contextmanager
def one_time(fn_name: str = "") -> Iterator[None]:
    """Record the block as a program's one-time work (:data:`SETUP_EVENT`, a
    ``jax.monitoring`` time span), which :func:`one_time_clock` leaves out of a run's time:
    what is paid once a process, as compiling is (a first run, a timing).

    Example:
        >>> import time
        >>> with one_time_clock() as seconds:
        ...     with one_time("warm-up"):
        ...         time.sleep(0.01)
        >>> seconds() >= 0.01
        True
    """
    start = time.time()  # the clock of JAX's own event spans
    try:
        yield
    finally:
        jax.monitoring.record_event_time_span(SETUP_EVENT, start, time.time(), fn_name=fn_name)


def covered(intervals: list[tuple[float, float]], start: float = -math.inf, end: float = math.inf) -> float:
    """The length of the union of ``intervals`` within ``[start, end]``: a trace nests the
    traces of the jitted functions it calls, and compiles run in parallel threads, so
    their durations added would count the same seconds twice.

    Example:
        >>> covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.7)])
        4.0
        >>> covered([(0.0, 2.0)], start=1.0)
        1.0
    """
    total, reach = 0.0, start
    for low, high in sorted(intervals):
        low, high = max(low, reach), min(high, end)
        if high > low:
            total += high - low
            reach = high
    return total


@contextlib.contextmanager
def one_time_clock() -> Iterator[Callable[[], float]]:
    """Within the block, the wall seconds of programs' one-time work: JAX tracing, lowering
    and compiling, and what mcgrad records as :data:`SETUP_EVENT` (:data:`ONE_TIME_EVENTS`).

    Yields ``seconds()``, the union of those spans so far (:func:`covered`). A call timed
    around a run that may compile its program, less this, is what the run would take again:
    what the auto driver charges its measurements against, as the benchmarks report
    compile time apart.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> with one_time_clock() as seconds:
        ...     _ = jax.jit(lambda x: jnp.sin(x) * 2.0)(jnp.ones(3))
        >>> seconds() > 0.0
        True
    """
    spans: list[tuple[float, float]] = []

    def listener(event: str, start: float, end: float, **_: Any) -> None:
        if event in ONE_TIME_EVENTS:
            spans.append((start, end))

    jax.monitoring.register_event_time_span_listener(listener)
    try:
        yield lambda: covered(spans)
    finally:
        jax.monitoring.unregister_event_time_span_listener(listener)


def cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


class ProgramCache:
    """The compiled training programs of recent fits, so a second ``mg.fit`` of the same
    model, guide, objective, optimizer and argument shapes reuses the first's program.

    Owned by :func:`fit` (``mg.fit.cache``), for the process's lifetime, holding at most
    ``max_entries`` programs (least recently used dropped first), so memory stays flat over
    any number of fits. ``mg.fit.cache.clear()`` drops them all.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, fingerprint: Any, build: Callable[[], Any]) -> Any:
        try:
            entry = self.entries[fingerprint]
        except (KeyError, TypeError):  # TypeError: an unhashable fingerprint part
            self.misses += 1
            with one_time("build"):
                entry = build()
            try:
                self.entries[fingerprint] = entry
            except TypeError:
                return entry
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
            return entry
        self.hits += 1
        self.entries.move_to_end(fingerprint)
        return entry

    def clear(self) -> None:
        self.entries.clear()
