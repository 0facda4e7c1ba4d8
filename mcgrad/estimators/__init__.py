"""The estimator core: one surrogate contract and the estimators that follow it."""

from mcgrad.estimators.base import (
    EmptyState,
    Estimate,
    EstimatorInfo,
    GradientEstimator,
    Problem,
    estimate,
    grad,
    per_sample_grads,
    value_and_grad,
)
from mcgrad.estimators.measure_valued import measure_valued
from mcgrad.estimators.pathwise import pathwise
from mcgrad.estimators.score_function import score_function
from mcgrad.estimators.weak_derivatives import (
    WeakDerivative,
    register_weak_derivative,
    registered_families,
    weak_derivative_for,
)

__all__ = [
    "EmptyState",
    "Estimate",
    "EstimatorInfo",
    "GradientEstimator",
    "Problem",
    "WeakDerivative",
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
]
