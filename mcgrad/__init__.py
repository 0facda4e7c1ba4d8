"""mcgrad: Monte Carlo gradient estimation and the probabilistic models it trains.

    import mcgrad as mg
"""

from mcgrad import baselines, control_variates
from mcgrad.control_variates import delta_method, with_control_variate
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

__version__ = "0.1.0"

__all__ = [
    "EmptyState",
    "Estimate",
    "EstimatorInfo",
    "GradientEstimator",
    "Problem",
    "WeakDerivative",
    "baselines",
    "control_variates",
    "delta_method",
    "estimate",
    "grad",
    "measure_valued",
    "pathwise",
    "per_sample_grads",
    "register_weak_derivative",
    "registered_families",
    "score_function",
    "value_and_grad",
    "weak_derivative_for",
    "with_control_variate",
]
