"""Gaussian mixture fitted to iris by maximum likelihood, the assignment marginalised; scored by ARI.

    p(x) = Σ_k π_k N(x; μ_k, L_k L_kᵀ)      (``dist.MixtureSameFamily``: no latent site)

Fitted with ``mg.maximum_likelihood()`` on the 4 standardized iris measurements; each
point is assigned to its most responsible component ``argmax_k π_k N(x; μ_k, Σ_k)`` and
the clustering is scored against the species by the adjusted Rand index (0 = chance,
1 = the species exactly). Initialisation, the part that makes mixtures reliable:
k-means++ seeding from the data (fixed seed), a few Lloyd iterations, then each
component's mean, covariance and weight from its k-means cluster.

    python -m models.mixture --num-components 3
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


def mixture(logits, locs, scale_trils) -> dist.Distribution:
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.MultivariateNormal(locs, scale_tril=scale_trils))


def model(x, init, batch_size=None):
    """``x [N, D]`` ~ mixture of ``K`` full-covariance Gaussians; ``init`` = (logits, locs, scale_trils)."""
    logits = numpyro.param("logits", init[0])
    locs = numpyro.param("locs", init[1])
    scale_trils = numpyro.param("scale_trils", init[2], constraint=dist.constraints.lower_cholesky)
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as index:
        numpyro.sample("x", mixture(logits, locs, scale_trils), obs=x[index])


def _kmeans(x: np.ndarray, num_components: int, rng: np.random.Generator, num_iterations: int):
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, num_components):  # k-means++: next centre with probability ∝ squared distance
        squared = np.min(((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=squared / squared.sum())])
    centres = np.array(centres)
    for _ in range(num_iterations):  # Lloyd
        assignment = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        centres = np.array(
            [x[assignment == k].mean(0) if np.any(assignment == k) else centres[k] for k in range(num_components)]
        )
    squared = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return centres, squared.argmin(axis=1), squared.min(axis=1).sum()


def kmeans_init(x: np.ndarray, num_components: int, seed: int = 0, num_restarts: int = 10, num_iterations: int = 30):
    """Initial ``(logits [K], locs [K, D], scale_trils [K, D, D])`` from the best (lowest within-cluster
    sum of squares) of ``num_restarts`` k-means runs seeded by k-means++."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    runs = [_kmeans(x, num_components, rng, num_iterations) for _ in range(num_restarts)]
    centres, assignment, _ = min(runs, key=lambda run: run[2])
    dimension = x.shape[1]
    weights, scale_trils = [], []
    for k in range(num_components):
        members = x[assignment == k]
        weights.append(max(len(members), 1) / len(x))
        covariance = np.cov(members.T, bias=True) if len(members) > dimension else np.eye(dimension)
        scale_trils.append(np.linalg.cholesky(covariance + 1e-2 * np.eye(dimension)))
    as_array = lambda a: jnp.asarray(np.array(a), jnp.float32)  # noqa: E731
    return as_array(np.log(weights)), as_array(centres), as_array(scale_trils)


def responsibilities(params: dict, x) -> jax.Array:
    """``p(k | x_i)`` ``[N, K]``."""
    components = dist.MultivariateNormal(params["locs"], scale_tril=params["scale_trils"])
    log_joint = jax.nn.log_softmax(params["logits"])[None, :] + components.log_prob(jnp.asarray(x)[:, None, :])
    return jax.nn.softmax(log_joint, axis=1)


def run(
    num_steps: int = 1000,
    seed: int = 0,
    num_components: int = 3,
    learning_rate: float = 0.05,
    output_dir=None,
    progress_bar: bool = False,
) -> dict:
    """Fit, cluster, score. Metric: adjusted Rand index against the species."""
    from sklearn.metrics import adjusted_rand_score

    features, species = data.iris()
    x = jnp.asarray(features)
    init = kmeans_init(features, num_components, seed)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05))
    result, seconds = common.timed_fit(
        model, None, x, init,
        key=jax.random.key(seed), num_steps=num_steps, optimizer=optimizer,
        objective=mg.maximum_likelihood(), progress_bar=progress_bar,
    )
    clusters = np.asarray(jnp.argmax(responsibilities(result.params, x), axis=1))
    init_clusters = np.asarray(jnp.argmax(responsibilities(dict(zip(["logits", "locs", "scale_trils"], init)), x), axis=1))
    log_likelihood = mg.evaluation.log_likelihood(model, result.params, x, init)
    metrics = common.metrics(
        "maximum_likelihood", None, "adjusted_rand_index", adjusted_rand_score(species, clusters), seconds,
        kmeans_init_ari=float(adjusted_rand_score(species, init_clusters)),
        nll=-float(log_likelihood.mean),
        num_components=num_components,
        num_steps=num_steps,
    )
    if output_dir is not None:
        metrics["figure"] = common.save_figure(_figure(features, species, clusters, result.params), output_dir, "mixture")
    return metrics


def _figure(features, species, clusters, params):
    from sklearn.decomposition import PCA

    from scipy.optimize import linear_sum_assignment

    # colour each cluster like the species it overlaps most (labels are exchangeable)
    overlap = np.array([[np.sum((clusters == k) & (species == s)) for s in range(3)] for k in range(clusters.max() + 1)])
    cluster_rows, species_cols = linear_sum_assignment(-overlap)
    colour_of = dict(zip(cluster_rows, species_cols))
    clusters = np.array([colour_of.get(k, k) for k in clusters])
    pca = PCA(2).fit(features)
    projected = pca.transform(features)
    locs = pca.transform(np.asarray(params["locs"]))
    figure, axes = common.new_figure(2, 1, size=3.8)
    for axis, labels, title in zip(axes[0], [species, clusters], ["species", "mixture clusters"]):
        axis.scatter(projected[:, 0], projected[:, 1], c=labels, s=12, cmap="viridis")
        axis.set_title(title)
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
    axes[0, 1].scatter(locs[:, 0], locs[:, 1], marker="x", s=80, c="red", label="component means")
    axes[0, 1].legend(fontsize=8)
    return figure


def main(argv=None):
    parser = common.parser(__doc__, num_steps=1000)
    parser.add_argument("--num-components", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    common.report("mixture", run(**common.run_kwargs(args)))


if __name__ == "__main__":
    main()
