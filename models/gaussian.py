"""Full-covariance Gaussian fitted to iris by maximum likelihood, checked against its closed form.

    x_i ~ N(μ, L Lᵀ),   L lower-triangular with positive diagonal (``lower_cholesky``).

The MLE has a closed form — the sample mean and the biased sample covariance
``(1/N) Σ (x_i − x̄)(x_i − x̄)ᵀ`` — so the fit is a check of ``mg.fit`` +
``mg.maximum_likelihood()`` (full batch: no Monte Carlo noise at all). Data: the 4
standardized iris measurements, 100 points to fit and 50 held out.

    python -m models.gaussian --num-steps 1500
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import mcgrad as mg
from models import common, data

NUM_TEST = 50


def model(x, batch_size=None):
    """``x [N, D]`` ~ ``MultivariateNormal(loc, scale_tril)``; ``batch_size`` subsamples the plate."""
    dimension = x.shape[1]
    loc = numpyro.param("loc", jnp.zeros(dimension))
    scale_tril = numpyro.param("scale_tril", jnp.eye(dimension), constraint=dist.constraints.lower_cholesky)
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        numpyro.sample("x", dist.MultivariateNormal(loc, scale_tril=scale_tril), obs=x[index])


def closed_form_mle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sample mean and the biased sample covariance."""
    x = np.asarray(x, np.float64)
    loc = x.mean(axis=0)
    centred = x - loc
    return loc, centred.T @ centred / len(x)


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Iris (standardized) split into fit and held-out points: ``train, test, train_labels, test_labels``."""
    features, species = data.iris()
    order = np.random.default_rng(seed).permutation(len(features))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return features[train], features[test], species[train], species[test]


def run(num_steps: int = 1500, seed: int = 0, learning_rate: float = 0.05, output_dir=None, progress_bar: bool = False) -> dict:
    """Fit, compare with the closed form, score held-out data. Metric: the max abs error of the
    fitted covariance entries against the closed-form MLE."""
    train, test, train_labels, _ = split()
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01))
    result, seconds = common.timed_fit(
        model, None, jnp.asarray(train),
        key=jax.random.key(seed), num_steps=num_steps, optimizer=optimizer,
        objective=mg.maximum_likelihood(), progress_bar=progress_bar,
    )
    loc = np.asarray(result.params["loc"], np.float64)
    scale_tril = np.asarray(result.params["scale_tril"], np.float64)
    covariance = scale_tril @ scale_tril.T
    exact_loc, exact_covariance = closed_form_mle(train)
    held_out = mg.evaluation.log_likelihood(model, result.params, jnp.asarray(test))
    exact_held_out = float(np.mean(
        dist.MultivariateNormal(jnp.asarray(exact_loc), jnp.asarray(exact_covariance)).log_prob(jnp.asarray(test))
    ))
    metrics = common.metrics(
        "maximum_likelihood", None, "covariance_max_error", np.abs(covariance - exact_covariance).max(), seconds,
        loc_max_error=float(np.abs(loc - exact_loc).max()),
        train_nll=float(result.losses[-1] / len(train)),
        test_nll=-float(held_out.mean),
        closed_form_test_nll=-exact_held_out,
        num_steps=num_steps,
    )
    if output_dir is not None:
        metrics["figure"] = common.save_figure(
            _figure(train, train_labels, loc, covariance, exact_loc, exact_covariance), output_dir, "gaussian"
        )
    return metrics


def _ellipse(loc, covariance, dims, num_std=2.0):
    angles = np.linspace(0, 2 * np.pi, 200)
    sub = covariance[np.ix_(dims, dims)]
    circle = np.stack([np.cos(angles), np.sin(angles)])
    return (loc[list(dims), None] + num_std * np.linalg.cholesky(sub) @ circle).T


def _figure(x, labels, loc, covariance, exact_loc, exact_covariance):
    names = ["sepal length", "sepal width", "petal length", "petal width"]
    figure, axes = common.new_figure(2, 1, size=3.8)
    for axis, dims in zip(axes[0], [(0, 1), (2, 3)]):
        axis.scatter(x[:, dims[0]], x[:, dims[1]], c=labels, s=10, cmap="viridis", alpha=0.7)
        fitted = _ellipse(loc, covariance, dims)
        exact = _ellipse(exact_loc, exact_covariance, dims)
        axis.plot(exact[:, 0], exact[:, 1], "k-", lw=3, alpha=0.4, label="closed-form MLE")
        axis.plot(fitted[:, 0], fitted[:, 1], "r--", lw=1.5, label="mg.fit")
        axis.set_xlabel(names[dims[0]] + " (std.)")
        axis.set_ylabel(names[dims[1]] + " (std.)")
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("Full-covariance Gaussian on iris: 2σ ellipses")
    return figure


def main(argv=None):
    parser = common.parser(__doc__, num_steps=1500)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    common.report("gaussian", run(**common.run_kwargs(args)))


if __name__ == "__main__":
    main()
