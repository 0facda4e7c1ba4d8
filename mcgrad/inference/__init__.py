"""NumPyro programs under mcgrad's estimators, one module per job.

* :mod:`~mcgrad.inference.handlers`: the one handler stack every traced run goes through;
* :mod:`~mcgrad.inference.params`: finding ``numpyro.param`` sites and their constraints;
* :mod:`~mcgrad.inference.costs`: cost terms of a trace (log-densities, plates);
* :mod:`~mcgrad.inference.site_estimators`: choosing one estimator per latent site;
* :mod:`~mcgrad.inference.particles`: the particle engine that turns each latent site
  into a :class:`~mcgrad.Site` for its estimator.
"""
