"""The estimator core: one per-site contract and the estimators that follow it."""

from mcgrad.estimators.base import (
    EmptyState,
    Estimate,
    EstimatorInfo,
    GradientEstimator,
    Problem,
    Site,
    SiteInfo,
    draw_without_gradient,
    estimate,
    gradient_only,
    grad,
    linear_terms,
    per_coordinate,
    per_sample_grads,
    problem_site,
    row_sum,
    surrogate,
    value_and_grad,
)
from mcgrad.estimators.antithetic import arm, disarm
from mcgrad.estimators.choice import auto, register_candidate
from mcgrad.estimators.enumeration import enumerate
from mcgrad.estimators.log_prob import log_prob
from mcgrad.estimators.measure_valued import measure_valued
from mcgrad.estimators.pathwise import pathwise
from mcgrad.estimators.relaxed_control_variate import rebar, relax
from mcgrad.estimators.gumbel import gumbel_softmax
from mcgrad.estimators.score_function import score_function
from mcgrad.estimators.taylor_control_variate import double_control_variate
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
    "Site",
    "SiteInfo",
    "WeakDerivative",
    "arm",
    "auto",
    "disarm",
    "double_control_variate",
    "draw_without_gradient",
    "enumerate",
    "estimate",
    "grad",
    "gradient_only",
    "gumbel_softmax",
    "linear_terms",
    "log_prob",
    "measure_valued",
    "pathwise",
    "per_coordinate",
    "per_sample_grads",
    "problem_site",
    "rebar",
    "register_candidate",
    "register_weak_derivative",
    "registered_families",
    "relax",
    "row_sum",
    "score_function",
    "surrogate",
    "value_and_grad",
    "weak_derivative_for",
]
