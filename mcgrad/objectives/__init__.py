"""Objectives: what expectation is minimised. The estimators say how its gradient is estimated."""

from mcgrad.objectives.adversarial import AdversarialState, adversarial
from mcgrad.objectives.base import Objective, ObjectiveSetup
from mcgrad.objectives.elbo import elbo
from mcgrad.objectives.expectation import expectation
from mcgrad.objectives.iwae import iwae
from mcgrad.objectives.likelihood import maximum_likelihood
from mcgrad.objectives.renyi import renyi

__all__ = [
    "AdversarialState",
    "Objective",
    "ObjectiveSetup",
    "adversarial",
    "elbo",
    "expectation",
    "iwae",
    "maximum_likelihood",
    "renyi",
]
