"""Estimator tests trace with implicit rank promotion raising (see ``tests/conftest.py``)."""

import jax
import pytest


@pytest.fixture(autouse=True)
def rank_promotion_raises():
    with jax.numpy_rank_promotion("raise"):
        yield
