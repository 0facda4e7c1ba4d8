"""Test-wide settings.

The estimator tests run with implicit rank promotion (``[N] + [N, 1]``, ``[N, 3] * [3]``)
raising, like equinox's test suite, so shape bugs in mcgrad's array code fail loudly (see
``tests/estimators/conftest.py``). It is not set process-wide: NumPyro's own ``sample`` /
``log_prob`` rely on rank promotion for batched distributions, which every model test uses.

Every program the suite compiles uses LLVM at optimization level 1 on CPU, the level
``mg.fit`` already uses for its own programs (:func:`mcgrad.programs.compiler_options`):
compiling is most of the suite's time, and level 1 takes about a third less for the same
results (different rounding at most). Set here, before JAX starts its backend; subprocesses
(the CLI tests) inherit it.
"""

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()
