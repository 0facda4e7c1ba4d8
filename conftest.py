"""Test-session settings, loaded before anything imports JAX.

Most of the suite's time is XLA compiling many small programs, not running them, so the
tests compile with LLVM's optimisation off (about 4× faster compiles here; results are
the same to float tolerance, and every comparison in the tests runs under the same
flags). Benchmarks run as scripts, outside pytest, with the default flags.

Many tests compile the same program again (the same small model under another test's
closure): the session shares one on-disk XLA cache, every program in it however quick
to compile, made by the controlling process in a temporary directory its xdist workers
inherit and removed at the end (a subset of the suite: 188 s without it, 154 s with it).
A test that checks that mcgrad itself reuses a program counts a hit in this cache as a
compile (tests/test_workflow.py). A ``JAX_COMPILATION_CACHE_DIR`` set outside is used
as it is and left in place.

The controlling process imports ArviZ once before pytest-xdist starts its workers: ArviZ
0.23 writes a daily stamp file on import through one fixed temporary name, and workers
importing it together on a new day race on that name (one CI run lost a test module to
it). With today's stamp written first, the workers only read it.
"""

import os
import shutil
import tempfile

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

_SESSION_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ:  # the controlling process (or the only one)
    import arviz  # noqa: F401  (see the docstring)

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="mcgrad-tests-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
