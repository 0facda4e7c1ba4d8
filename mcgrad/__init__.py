"""mcgrad: Monte Carlo gradient estimation and the probabilistic models it trains.

    import mcgrad as mg
"""

from mcgrad import baselines, checkpoints, control_variates, diagnostics, evaluation, parallel
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
    Site,
    SiteInfo,
    WeakDerivative,
    arm,
    disarm,
    draw_without_gradient,
    enumerate,
    estimate,
    grad,
    gradient_only,
    gumbel_softmax,
    linear_terms,
    log_prob,
    measure_valued,
    pathwise,
    per_coordinate,
    per_sample_grads,
    problem_site,
    rebar,
    register_weak_derivative,
    registered_families,
    relax,
    row_sum,
    score_function,
    surrogate,
    value_and_grad,
    weak_derivative_for,
)
from mcgrad.fit import (
    FitResult,
    FitState,
    NonFiniteError,
    StepInfo,
    Trainer,
    TrainingDiagnostics,
    fit,
    load_checkpoint,
    save_checkpoint,
    trainer,
)
from mcgrad.objectives import (
    Objective,
    adversarial,
    elbo,
    expectation,
    iwae,
    maximum_likelihood,
    renyi,
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
    "checkpoints",
    "EmptyState",
    "Estimate",
    "EstimatorInfo",
    "FitResult",
    "FitState",
    "NonFiniteError",
    "Objective",
    "GradientEstimator",
    "Problem",
    "Site",
    "SiteInfo",
    "StepInfo",
    "Trainer",
    "TrainingDiagnostics",
    "WeakDerivative",
    "adversarial",
    "arm",
    "baselines",
    "control_variates",
    "delta_method",
    "disarm",
    "draw_without_gradient",
    "enumerate",
    "gradient_only",
    "gumbel_softmax",
    "linear_terms",
    "log_prob",
    "renyi",
    "row_sum",
    "surrogate",
    "trainer",
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
    "per_coordinate",
    "per_sample_grads",
    "problem_site",
    "rebar",
    "register_weak_derivative",
    "registered_families",
    "relax",
    "save_checkpoint",
    "score_function",
    "value_and_grad",
    "weak_derivative_for",
    "with_control_variate",
]
