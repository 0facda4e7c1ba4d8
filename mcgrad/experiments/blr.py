r"""The paper's Bayesian logistic regression experiment (Mohamed et al. 2020, §8.3).

Data: scikit-learn's breast-cancer set (569 points, 30 standardised features plus a
bias, ``D = 31``), labels in {0, 1}. Prior ``w ~ N(0, I)``; mean-field Gaussian guide
with mean and log-scale initialised at 0. Each step: a minibatch of ``B = 32``,
``N = 50`` guide samples, SGD at learning rate ``1e-3`` with cosine decay, for 5000
steps. Evaluated on the full data with 1000 posterior samples: ELBO, accuracy, and the
gradient variance recorded during training.

The negative ELBO on a minibatch is an expectation under the guide,

.. math::  E_{q_θ(w)}\big[\log q_θ(w) − \log p(w) − \tfrac{n}{B} \textstyle\sum_{i∈batch} \log p(y_i | x_i, w)\big],

so every core estimator applies as is (through :func:`mcgrad.expectation`), the
delta-method control variate included.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd

import mcgrad as mg


class BreastCancer(NamedTuple):
    features: np.ndarray  # [569, 31], standardised, last column the bias
    labels: np.ndarray  # [569], float 0/1


def load_breast_cancer() -> BreastCancer:
    """scikit-learn's bundled breast-cancer data, standardised, with a bias column."""
    from sklearn.datasets import load_breast_cancer as load

    data = load()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(np.float32)
    return BreastCancer(x, data.target.astype(np.float32))


def model(features, labels=None, batch_size=None):
    """``w ~ N(0, I)``, ``y_i ~ Bernoulli(σ(x_iᵀ w))`` — the NumPyro form of the same model."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([features.shape[1]]).to_event(1))
    with numpyro.plate("data", features.shape[0], subsample_size=batch_size) as index:
        y = None if labels is None else labels[index]
        numpyro.sample("y", dist.Bernoulli(logits=features[index] @ w), obs=y)


def guide(features, labels=None, batch_size=None):
    """Mean-field Gaussian guide, mean and log-scale initialised at 0."""
    dim = features.shape[1]
    loc = numpyro.param("loc", jnp.zeros(dim))
    log_scale = numpyro.param("log_scale", jnp.zeros(dim))
    numpyro.sample("w", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))


def guide_distribution(params) -> dist.Distribution:
    return dist.Normal(params["loc"], jnp.exp(params["log_scale"])).to_event(1)


def negative_elbo_cost(num_data: int):
    """``(w, params, (x, y)) -> log q(w) − log p(w) − (n/B) Σ log p(y | x, w)``."""

    def cost(w, params, batch):
        features, labels = batch
        log_likelihood = jnp.sum(dist.Bernoulli(logits=features @ w).log_prob(labels))
        scale = num_data / features.shape[0]
        log_prior = jnp.sum(dist.Normal(0.0, 1.0).log_prob(w))
        return guide_distribution(params).log_prob(w) - log_prior - scale * log_likelihood

    return cost


def estimators() -> dict[str, mg.GradientEstimator]:
    """The estimators the paper compares."""
    return {
        "pathwise": mg.pathwise(),
        "score function": mg.score_function(),
        "score function + moving average": mg.score_function(baseline=mg.baselines.moving_average(0.9)),
        "score function + delta method": mg.with_control_variate(mg.score_function(), mg.delta_method()),
        "measure-valued (coupled)": mg.measure_valued(),
    }


def evaluations_per_sample(estimator: mg.GradientEstimator, data, init: dict, num_samples: int = 4) -> float:
    """Cost evaluations per guide sample (1 for pathwise and score function, 1 + 2·62 measure-valued, …)."""
    cost = negative_elbo_cost(data[0].shape[0])
    count = mg.count_evaluations(lambda w: cost(w, init, data), guide_distribution, estimator, init, num_samples=num_samples)
    return count / num_samples


class Evaluation(NamedTuple):
    elbo: float
    accuracy: float


def evaluate(params: dict, data: BreastCancer, key: jax.Array, num_samples: int = 1000) -> Evaluation:
    """ELBO and accuracy (posterior-predictive mean > ½) on the full data."""
    features, labels = jnp.asarray(data.features), jnp.asarray(data.labels)
    q = guide_distribution(params)
    w = q.sample(key, (num_samples,))
    logits = w @ features.T
    log_likelihood = jnp.sum(dist.Bernoulli(logits=logits).log_prob(labels), axis=1)
    log_prior = jnp.sum(dist.Normal(0.0, 1.0).log_prob(w), axis=1)
    elbo = jnp.mean(log_likelihood + log_prior - q.log_prob(w))
    predictive = jnp.mean(jax.nn.sigmoid(logits), axis=0)
    accuracy = jnp.mean((predictive > 0.5) == (labels > 0.5))
    return Evaluation(float(elbo), float(accuracy))


class Comparison(NamedTuple):
    table: pd.DataFrame
    results: dict  # estimator name -> mg.FitResult


def run(
    *,
    num_steps: int = 5000,
    learning_rate: float = 1e-3,
    num_samples: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    names: list[str] | None = None,
    progress_bar: bool = True,
    diagnostics_every: int = 50,
) -> Comparison:
    """Fit the guide with each estimator and tabulate ELBO, accuracy, gradient variance, time.

    The gradient variance is that of each step's gradient estimate (across the ``N``
    per-sample gradients, divided by ``N``), averaged over the 62 guide parameters, then
    averaged (mean, dominated by the first steps) or taken the median of over training.
    """
    data = load_breast_cancer()
    batch = (jnp.asarray(data.features), jnp.asarray(data.labels))
    dim = data.features.shape[1]
    init = {"loc": jnp.zeros(dim), "log_scale": jnp.zeros(dim)}
    optimizer = optax.sgd(optax.cosine_decay_schedule(learning_rate, num_steps))
    key = jax.random.key(seed)
    rows, results = [], {}
    chosen = estimators()
    for name in names or list(chosen):
        objective = mg.expectation(
            negative_elbo_cost(data.features.shape[0]),
            guide_distribution,
            init,
            estimator=chosen[name],
            num_samples=num_samples,
            data=batch,
            batch_size=batch_size,
        )._replace(name=name)
        start = time.perf_counter()
        result = mg.fit(
            None,
            None,
            key=key,
            num_steps=num_steps,
            optimizer=optimizer,
            objective=objective,
            progress_bar=progress_bar,
            diagnostics_every=diagnostics_every,
            max_nonfinite=num_steps,
        )
        seconds = time.perf_counter() - start
        evaluation = evaluate(result.params, data, jax.random.key(seed + 1))
        per_step = np.mean(np.stack(list(result.diagnostics.variance.values())), axis=0)
        rows.append(
            {
                "estimator": name,
                "final ELBO": evaluation.elbo,
                "accuracy": evaluation.accuracy,
                "mean gradient variance": float(np.mean(per_step)),
                "median gradient variance": float(np.median(per_step)),
                "evaluations per sample": evaluations_per_sample(chosen[name], batch, init),
                "skipped steps": int(result.state.num_nonfinite),
                "seconds": seconds,
            }
        )
        results[name] = result
    return Comparison(pd.DataFrame(rows), results)


def plot(comparison: Comparison, path) -> None:
    """ELBO (negative loss, smoothed) and gradient variance over training, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in comparison.results.items():
        losses = np.asarray(result.losses)
        window = max(1, len(losses) // 50)
        smooth = np.convolve(np.nan_to_num(-losses, nan=np.nan), np.ones(window) / window, mode="valid")
        left.plot(np.arange(len(smooth)) + window // 2, smooth, label=name)
        steps = result.diagnostics.steps
        variance = np.mean(np.stack([v for v in result.diagnostics.variance.values()]), axis=0)
        right.plot(steps, variance, label=name)
    left.set(xlabel="step", ylabel="minibatch ELBO (smoothed)", title="ELBO during training")
    left.set_ylim(bottom=max(left.get_ylim()[0], -2000))
    right.set(xlabel="step", ylabel="gradient variance (mean over parameters)", yscale="log", title="Gradient variance")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
