"""The model zoo: one runnable module per model (``python -m models.<name>``).

Every module declares its model in NumPyro, fits it with :func:`mcgrad.fit`, and exposes

* ``run(num_steps=..., seed=..., output_dir=None, progress_bar=False, ...) -> dict`` with
  at least ``objective``, ``estimator``, ``metric_name``, ``metric``, ``fit_seconds``
  (and ``figure`` when ``output_dir`` is given) — what the tests and
  ``benchmarks/models.py`` call;
* ``main(argv=None)`` — the command line (see :mod:`models.common`).

Shared pieces: :mod:`models.data` (the data sets) and :mod:`models.common` (CLI,
timing, figures).
"""
