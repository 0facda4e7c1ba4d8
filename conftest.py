"""Test-session settings, loaded before anything imports JAX.

Most of the suite's time is XLA compiling many small programs, not running them, so the
tests compile with LLVM's optimisation off (about 4× faster compiles here; results are
the same to float tolerance, and every comparison in the tests runs under the same
flags). Benchmarks run as scripts, outside pytest, with the default flags.

The controlling process imports ArviZ once before pytest-xdist starts its workers: ArviZ
0.23 writes a daily stamp file on import through one fixed temporary name, and workers
importing it together on a new day race on that name (one CI run lost a test module to
it). With today's stamp written first, the workers only read it.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

if "PYTEST_XDIST_WORKER" not in os.environ:
    import arviz  # noqa: F401  (see the docstring)
