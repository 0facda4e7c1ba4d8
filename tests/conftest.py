"""Test-wide settings.

The estimator tests run with implicit rank promotion (``[N] + [N, 1]``, ``[N, 3] * [3]``)
raising, like equinox's test suite, so shape bugs in mcgrad's array code fail loudly (see
``tests/estimators/conftest.py``). It is not set process-wide: NumPyro's own ``sample`` /
``log_prob`` rely on rank promotion for batched distributions, which every model test uses.
"""
