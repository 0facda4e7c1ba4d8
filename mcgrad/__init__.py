"""mcgrad: Monte Carlo gradient estimation and the probabilistic models it trains.

    import mcgrad as mg
"""

from mcgrad import baselines, control_variates, diagnostics, evaluation
from mcgrad.control_variates import delta_method, with_control_variate
from mcgrad.diagnostics import (
    Comparison,
    Diagnostics,
    GradientStatistics,
    compare,
    count_evaluations,
    diagnose,
    gradient_statistics,
    variance_sweep,
)
from mcgrad.estimators import (
    EmptyState,
    Estimate,
    EstimatorInfo,
    GradientEstimator,
    Problem,
    WeakDerivative,
    estimate,
    grad,
    measure_valued,
    pathwise,
    per_sample_grads,
    register_weak_derivative,
    registered_families,
    score_function,
    value_and_grad,
    weak_derivative_for,
)
from mcgrad.fit import (
    FitResult,
    FitState,
    NonFiniteError,
    fit,
    load_checkpoint,
    save_checkpoint,
)
from mcgrad.objectives import (
    Objective,
    adversarial,
    elbo,
    expectation,
    iwae,
    maximum_likelihood,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # mg.plotting imports matplotlib on first use only.
    if name == "plotting":
        import importlib

        return importlib.import_module("mcgrad.plotting")
    raise AttributeError(f"module 'mcgrad' has no attribute '{name}'")


__all__ = [
    "Comparison",
    "Diagnostics",
    "GradientStatistics",
    "compare",
    "count_evaluations",
    "diagnose",
    "diagnostics",
    "gradient_statistics",
    "plotting",
    "variance_sweep",
    "EmptyState",
    "Estimate",
    "EstimatorInfo",
    "FitResult",
    "FitState",
    "NonFiniteError",
    "Objective",
    "GradientEstimator",
    "Problem",
    "WeakDerivative",
    "adversarial",
    "baselines",
    "control_variates",
    "delta_method",
    "elbo",
    "evaluation",
    "estimate",
    "expectation",
    "fit",
    "iwae",
    "load_checkpoint",
    "maximum_likelihood",
    "parallel",
    "grad",
    "measure_valued",
    "pathwise",
    "per_sample_grads",
    "register_weak_derivative",
    "registered_families",
    "save_checkpoint",
    "score_function",
    "value_and_grad",
    "weak_derivative_for",
    "with_control_variate",
]
