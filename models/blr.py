"""Bayesian logistic regression on breast cancer: mean-field VI with mg.elbo against NUTS.

The model of the paper's §8.3 (:mod:`mcgrad.experiments.blr`): 569 patients, 30
standardized features plus a bias (``D = 31``), ``w ~ N(0, I)``,
``y_i ~ Bernoulli(σ(x_iᵀ w))``, and a mean-field Gaussian guide. ``mg.fit`` with
``mg.elbo`` fits the guide (pathwise by default; ``--estimator`` swaps it); NUTS
(``numpyro.infer.MCMC``) draws the reference posterior. Both go to ArviZ —
``result.to_inference_data()`` and ``az.from_numpyro(mcmc)`` — and ``az.summary`` of each
is compared coefficient by coefficient:

* ``max_mean_deviation = max_d |mean_guide,d − mean_nuts,d| / sd_nuts,d`` (the metric);
* ``median_sd_ratio = median_d sd_guide,d / sd_nuts,d`` (mean-field VI underestimates
  posterior spread when coefficients are correlated, so expect it below 1).

    python -m models.blr
"""

from __future__ import annotations

import time

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from numpyro.infer import MCMC, NUTS

import mcgrad as mg
from mcgrad.experiments.blr import guide, load_breast_cancer, model
from models import common


def nuts(features, labels, key: jax.Array, num_warmup: int = 500, num_samples: int = 500) -> MCMC:
    """The reference posterior: one NUTS chain on the full data."""
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_samples, num_chains=1, progress_bar=False)
    mcmc.run(key, features, labels)
    return mcmc


def compare_summaries(guide_summary: pd.DataFrame, nuts_summary: pd.DataFrame) -> pd.DataFrame:
    """Per-coefficient table: guide and NUTS means and sds, and ``|Δmean| / sd_nuts``."""
    table = pd.DataFrame(
        {
            "mean_guide": guide_summary["mean"],
            "mean_nuts": nuts_summary["mean"],
            "sd_guide": guide_summary["sd"],
            "sd_nuts": nuts_summary["sd"],
        }
    )
    table["mean_deviation"] = (table["mean_guide"] - table["mean_nuts"]).abs() / table["sd_nuts"]
    table["sd_ratio"] = table["sd_guide"] / table["sd_nuts"]
    return table


def figure(table: pd.DataFrame):
    """Posterior mean ± sd per coefficient: the guide beside NUTS."""
    fig, axes = common.new_figure(1, 1, size=4.0)
    ax = axes[0, 0]
    fig.set_size_inches(9, 3.6)
    index = np.arange(len(table))
    ax.errorbar(index - 0.15, table["mean_nuts"], yerr=table["sd_nuts"], fmt="o", ms=3, label="NUTS")
    ax.errorbar(index + 0.15, table["mean_guide"], yerr=table["sd_guide"], fmt="s", ms=3, label="mean-field VI (mg.elbo)")
    ax.set_xticks(index)
    ax.set_xticklabels([f"w{i}" for i in index], rotation=90, fontsize=7)
    ax.set_ylabel("posterior mean ± sd")
    ax.set_title(f"BLR on breast cancer: max |Δmean|/sd = {table['mean_deviation'].max():.2f}")
    ax.legend(fontsize=8)
    return fig


def run(
    num_steps: int = 3000,
    seed: int = 0,
    estimator: str | None = "default",
    output_dir: str | None = None,
    progress_bar: bool = False,
    num_particles: int = 16,
    learning_rate: float = 0.02,
    batch_size: int | None = None,
    num_warmup: int = 500,
    num_samples: int = 500,
) -> dict:
    """Fit the guide with ``mg.elbo``, run NUTS, compare their ``az.summary`` tables.

    Returns the metrics dict of :func:`models.common.metrics` with ``metric`` the maximum
    over coefficients of ``|mean_guide − mean_nuts| / sd_nuts``, plus ``median_sd_ratio``,
    ``nuts_seconds`` and ``table`` (the per-coefficient comparison as records).
    """
    data = load_breast_cancer()
    features, labels = jnp.asarray(data.features), jnp.asarray(data.labels)
    key_fit, key_nuts, key_draws = jax.random.split(jax.random.key(seed), 3)
    site_estimator = common.estimator_from_name(estimator)
    result, seconds = common.timed_fit(
        model,
        guide,
        features,
        labels,
        batch_size,
        key=key_fit,
        num_steps=num_steps,
        optimizer=optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05)),
        objective=mg.elbo(num_particles),
        estimators=None if site_estimator is None else {"w": site_estimator},
        progress_bar=progress_bar,
    )
    # The guide's draws and the log-likelihood on the full data (no minibatch plate).
    full = result._replace(args=(features, labels, None))
    guide_idata = full.to_inference_data(num_samples=1000, key=key_draws)
    start = time.perf_counter()
    mcmc = nuts(features, labels, key_nuts, num_warmup, num_samples)
    nuts_seconds = time.perf_counter() - start
    nuts_idata = az.from_numpyro(mcmc)
    guide_summary = az.summary(guide_idata, var_names=["w"], kind="stats")
    nuts_summary = az.summary(nuts_idata, var_names=["w"], kind="stats")
    table = compare_summaries(guide_summary, nuts_summary)
    metrics = common.metrics(
        "elbo",
        estimator or "default",
        "max abs(mean_guide − mean_nuts) / sd_nuts",
        table["mean_deviation"].max(),
        seconds,
        median_mean_deviation=float(table["mean_deviation"].median()),
        median_sd_ratio=float(table["sd_ratio"].median()),
        nuts_seconds=nuts_seconds,
        final_loss=float(np.nanmean(result.losses[-100:])),
        num_steps=num_steps,
    )
    metrics["table"] = table.round(4).reset_index(names="coefficient").to_dict("records")
    if output_dir is not None:
        metrics["figure"] = common.save_figure(figure(table), output_dir, "blr")
    return metrics


def main(argv=None):
    parser = common.parser(__doc__, num_steps=3000, estimators=True)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: full data)")
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args(argv)
    metrics = run(**common.run_kwargs(args))
    table = pd.DataFrame(metrics.pop("table")).set_index("coefficient")
    print(table.to_string())
    common.report("blr", metrics)


if __name__ == "__main__":
    main()
