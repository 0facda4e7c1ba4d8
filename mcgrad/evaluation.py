r"""Evaluation of fitted models on the end goal, not on the training loss.

* explicit models: the exact held-out log-likelihood, :func:`log_likelihood`;
* latent-variable models: the importance-weighted bound with ``K`` samples,
  :func:`iwae_bound` (``→ log p(x)`` as ``K → ∞``);
* implicit models (samples only): the kernel two-sample statistic :func:`mmd`, the
  classifier two-sample test :func:`classifier_two_sample_test`, and
  :func:`mode_coverage` for targets with known modes;
* representations: :func:`downstream_accuracy` of a logistic regression on them.

Per-datum quantities are indexed by the model's data plate (``plate=`` names it; by
default the one plate every observed site sits in). Evaluate on the full held-out set:
a plate with ``subsample_size`` would score a random minibatch, so models take their
batch size as an argument and evaluation passes ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mcgrad.inference import handlers
from mcgrad.inference.costs import site_log_prob
from mcgrad.objectives.elbo import sum_out, summed_out_site

Array = jax.Array

# --------------------------------------------------------------------------- plates and per-datum sums


def _plates_of(site: dict) -> dict[str, tuple[int, int]]:
    return {frame.name: (frame.dim, frame.size) for frame in site["cond_indep_stack"] if frame.dim is not None}


def _data_plate(sites: list[dict], plate: str | None) -> tuple[str, int] | None:
    """The ``(name, dim)`` of the data plate: ``plate`` if given, else the one plate shared by all ``sites``."""
    if plate is not None:
        for site in sites:
            if plate in _plates_of(site):
                return plate, _plates_of(site)[plate][0]
        raise ValueError(f"no observed site of the model is inside a plate named '{plate}'.")
    shared = None
    for site in sites:
        names = set(_plates_of(site))
        shared = names if shared is None else shared & names
    shared = sorted(shared or ())
    if len(shared) > 1:
        raise ValueError(
            f"the observed sites share several plates {shared}; name the data plate with plate='...'."
        )
    if not shared:
        return None
    return shared[0], _plates_of(sites[0])[shared[0]][0]


def _check_full_data(site: dict) -> None:
    if site.get("scale") is not None and not (np.ndim(site["scale"]) == 0 and float(site["scale"]) == 1.0):
        raise ValueError(
            f"site '{site['name']}' is scaled (scale={site['scale']}): a plate with subsample_size scores "
            "a random minibatch. Evaluate on the full held-out data (give the model batch_size=None)."
        )


def _per_datum(log_prob: Array, site: dict, plate: tuple[str, int] | None, num_data: int) -> tuple[Array, Array]:
    """Split a site's log-prob into a per-datum part ``[N]`` and a global scalar part."""
    log_prob = jnp.asarray(log_prob)
    if plate is None:  # no plates: data along batch axis 0
        if log_prob.ndim >= 1 and log_prob.shape[0] == num_data:
            return jnp.reshape(log_prob, (num_data, -1)).sum(axis=1), jnp.zeros(())
        return jnp.zeros(num_data), jnp.sum(log_prob)
    name, dim = plate
    if name not in _plates_of(site) or -dim > log_prob.ndim or log_prob.shape[dim] != num_data:
        return jnp.zeros(num_data), jnp.sum(log_prob)
    moved = jnp.moveaxis(log_prob, dim, 0)
    return jnp.reshape(moved, (num_data, -1)).sum(axis=1), jnp.zeros(())


def _num_data(sites: list[dict], plate: tuple[str, int] | None) -> int:
    if plate is not None:
        return _plates_of(sites[0])[plate[0]][1]
    shapes = [jnp.shape(site["fn"].log_prob(site["value"])) for site in sites]
    leading = {shape[0] for shape in shapes if len(shape) >= 1}
    return leading.pop() if len(leading) == 1 else 1


# --------------------------------------------------------------------------- explicit models


class LogLikelihood(NamedTuple):
    """Held-out log-likelihood: ``mean`` over data, ``total``, and ``per_datum`` ``[N]``.

    Observed sites outside the data plate count in ``total`` and are spread evenly over
    the data in ``mean`` and ``per_datum``.
    """

    mean: Array
    total: Array
    per_datum: Array


def log_likelihood(model: Callable, params: dict, *args, plate: str | None = None, key: Array | None = None, **kwargs) -> LogLikelihood:
    r"""Exact held-out log-likelihood of an explicit model with fitted ``params``.

    Runs ``model(*args, **kwargs)`` with ``params`` substituted and sums the observed sites'
    log-probabilities per datum ``i`` of the data plate:

    .. math:: \log p_θ(x_i) = Σ_{\text{observed sites } s} \log p_θ(x_{s,i}),
              \qquad \text{mean} = \frac{1}{N} Σ_i \log p_θ(x_i).

    Every sample site must be observed (marginalise discrete assignments, e.g.
    ``dist.MixtureSameFamily``); use :func:`iwae_bound` for latent-variable models.

    Args:
        model: a NumPyro model; the held-out data go in ``*args`` / ``**kwargs``.
        params: constrained values of its ``numpyro.param`` sites (``FitResult.params``).
        plate: name of the data plate (default: the one plate all observed sites share).
        key: seeds the model's draws if it makes any (default ``jax.random.key(0)``).

    Returns:
        :class:`LogLikelihood` in nats.

    Example:
        >>> import jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist
        >>> def model(x):
        ...     loc = numpyro.param("loc", 0.0)
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)
        >>> result = mg.evaluation.log_likelihood(model, {"loc": 0.0}, jnp.zeros(4))
        >>> round(float(result.mean), 4), round(float(result.total), 4)   # 4 · log N(0; 0, 1)
        (-0.9189, -3.6758)
    """
    key = jax.random.key(0) if key is None else key
    return _log_likelihood(model, params, args, kwargs, key, plate)


@eqx.filter_jit
def _log_likelihood(model, params, args, kwargs, key, plate) -> LogLikelihood:
    trace = handlers.run(model, args, kwargs, key=key, params=params)
    sample_sites = [s for s in trace.values() if s["type"] == "sample"]
    latent = [s["name"] for s in sample_sites if not s["is_observed"]]
    if latent:
        raise ValueError(
            f"log_likelihood() needs an explicit model, but sites {latent} are latent. Marginalise them "
            "in the model, or bound log p(x) with mg.evaluation.iwae_bound(model, guide, params, ...)."
        )
    observed = [s for s in sample_sites if s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site to score.")
    for site in observed:
        _check_full_data(site)
    data_plate = _data_plate(observed, plate)
    num_data = _num_data(observed, data_plate)
    per_datum, global_part = jnp.zeros(num_data), jnp.zeros(())
    for site in observed:
        local, shared = _per_datum(site_log_prob(site, scaled=False), site, data_plate, num_data)
        per_datum, global_part = per_datum + local, global_part + shared
    per_datum = per_datum + global_part / num_data
    total = jnp.sum(per_datum)
    return LogLikelihood(total / num_data, total, per_datum)


# --------------------------------------------------------------------------- latent-variable models


class IWAEBound(NamedTuple):
    """The importance-weighted bound: ``mean`` per datum, ``total``, ``per_datum`` ``[N]``, ``num_samples`` K."""

    mean: Array
    total: Array
    per_datum: Array
    num_samples: int


def iwae_bound(
    model: Callable,
    guide: Callable,
    params: dict,
    *args,
    key: Array,
    num_samples: int = 100,
    plate: str | None = None,
    batch_size: int | None = None,
    **kwargs,
) -> IWAEBound:
    r"""The importance-weighted lower bound on the held-out ``log p(x)`` with ``K`` samples.

    .. math:: \mathcal{L}_K(x_i) = \log \frac{1}{K} Σ_{k=1}^K \frac{p_θ(x_i, z_{ik})}{q_φ(z_{ik} \mid x_i)},
              \qquad z_{ik} \sim q_φ(\cdot \mid x_i),

    with ``E[𝓛_1] = ELBO ≤ E[𝓛_K] ≤ E[𝓛_{K+1}] ≤ log p(x)`` and ``𝓛_K → log p(x)``
    (Burda et al., 2016). With local latents (every latent site inside the data plate)
    the bound is per datum; a latent outside the plate couples the data, and the bound
    is then taken over the whole data set and spread evenly per datum.

    Args:
        model: a NumPyro model; the held-out data go in ``*args`` / ``**kwargs``.
        guide: the NumPyro guide fitted with it; it gets the same arguments.
        params: constrained parameter values of both (``FitResult.params``).
        key: a ``jax.random.key`` for the ``K`` guide draws.
        num_samples: ``K``.
        plate: the data plate's name (default: the one plate the observed sites share).
        batch_size: evaluate this many of the ``K`` samples at a time (memory), default all.

    Returns:
        :class:`IWAEBound` in nats.

    Example:
        >>> import jax, jax.numpy as jnp, mcgrad as mg, numpyro, numpyro.distributions as dist
        >>> def model(x):
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):   # the exact posterior N(x/2, 1/2)
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
        >>> x = jnp.array([0.0, 1.0])
        >>> bound = mg.evaluation.iwae_bound(model, guide, {}, x, key=jax.random.key(0), num_samples=10)
        >>> exact = dist.Normal(0.0, 2.0 ** 0.5).log_prob(x)
        >>> bool(jnp.allclose(bound.per_datum, exact, atol=1e-5))
        True
    """
    return _iwae_bound(model, guide, params, args, kwargs, key, num_samples, plate, batch_size or num_samples)


@eqx.filter_jit
def _iwae_bound(model, guide, params, args, kwargs, key, num_samples, plate, batch_size) -> IWAEBound:
    trace_key = jax.random.key(0)
    guide_trace = handlers.run(guide, args, kwargs, key=trace_key, params=params)
    model_trace = handlers.run(model, args, kwargs, key=trace_key, params=params, replay_trace=guide_trace)
    observed = [s for s in model_trace.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site to score.")
    for site in list(model_trace.values()) + list(guide_trace.values()):
        if site["type"] == "sample":
            _check_full_data(site)
    summed = summed_out_site(model, model_trace, guide_trace, params, trace_key, args, kwargs)
    missing = [
        n for n, s in model_trace.items()
        if s["type"] == "sample" and not s["is_observed"] and n not in guide_trace and (summed is None or n != summed.name)
    ]
    if missing:
        raise ValueError(f"the guide has no sample site for the model's latent sites {missing}.")
    data_plate = _data_plate(observed, plate)
    num_data = _num_data(observed, data_plate)

    def log_weights(sample_key):
        q_trace = handlers.run(guide, args, kwargs, key=sample_key, params=params)
        p_trace = handlers.run(model, args, kwargs, key=sample_key, params=params, replay_trace=q_trace)
        readers = summed.readers if summed is not None else frozenset()
        # (log-density, its site for the plates, sign): a summed-out site's readers as one marginal term
        terms = [(site_log_prob(site, scaled=False), site, 1.0) for site in p_trace.values()
                 if site["type"] == "sample" and site["name"] not in readers]
        terms += [(site_log_prob(site, scaled=False), site, -1.0) for site in q_trace.values()
                  if site["type"] == "sample" and not site["is_observed"]]
        if summed is not None:
            def run(value):
                return handlers.run(model, args, kwargs, key=sample_key, params=params, values={summed.name: value},
                                    replay_trace=q_trace)

            terms.append((sum_out(run, summed)[1], model_trace[summed.name], 1.0))
        local, shared = jnp.zeros(num_data), jnp.zeros(())
        for log_prob, site, sign in terms:
            per, rest = _per_datum(log_prob, site, data_plate, num_data)
            local, shared = local + sign * per, shared + sign * rest
        return local, shared

    keys = jax.random.split(key, num_samples)
    local, shared = jax.lax.map(log_weights, keys, batch_size=batch_size)
    log_k = jnp.log(num_samples)
    latent_outside_plate = any(
        s["type"] == "sample" and jnp.size(site_log_prob(s, scaled=False)) > 0 and not _is_local(s, data_plate, num_data)
        for s in guide_trace.values()
    )
    if latent_outside_plate:
        total = jax.nn.logsumexp(jnp.sum(local, axis=1) + shared) - log_k
        per_datum = jnp.full(num_data, total / num_data)
    else:
        per_datum = jax.nn.logsumexp(local + shared[:, None] / num_data, axis=0) - log_k
        total = jnp.sum(per_datum)
    return IWAEBound(total / num_data, total, per_datum, num_samples)


def _is_local(site: dict, plate: tuple[str, int] | None, num_data: int) -> bool:
    log_prob = site_log_prob(site, scaled=False)
    if plate is None:
        return log_prob.ndim >= 1 and log_prob.shape[0] == num_data
    name, dim = plate
    return name in _plates_of(site) and -dim <= log_prob.ndim and log_prob.shape[dim] == num_data


# --------------------------------------------------------------------------- implicit models: two-sample tests


class MMD(NamedTuple):
    """Unbiased ``mmd2`` estimate, the Gaussian kernel ``bandwidth`` and a permutation ``p_value``
    (NaN without permutations)."""

    mmd2: Array
    bandwidth: Array
    p_value: Array


def median_bandwidth(samples: Array) -> Array:
    """The median heuristic: the median pairwise Euclidean distance of ``samples`` ``[N, D]``."""
    squared = _squared_distances(samples, samples)
    upper = jnp.triu_indices(samples.shape[0], k=1)
    return jnp.median(jnp.sqrt(squared[upper]))


def _squared_distances(a: Array, b: Array) -> Array:
    return jnp.maximum(
        jnp.sum(a**2, axis=1)[:, None] + jnp.sum(b**2, axis=1)[None, :] - 2.0 * a @ b.T, 0.0
    )


def _unbiased_mmd2(kernel: Array, is_x: Array, num_x: int, num_y: int) -> Array:
    off_diagonal = kernel * (1.0 - jnp.eye(kernel.shape[0], dtype=kernel.dtype))
    x = is_x.astype(kernel.dtype)
    y = 1.0 - x
    xx = x @ off_diagonal @ x / (num_x * (num_x - 1))
    yy = y @ off_diagonal @ y / (num_y * (num_y - 1))
    xy = x @ kernel @ y / (num_x * num_y)
    return xx + yy - 2.0 * xy


def mmd(
    x: Array,
    y: Array,
    bandwidth: float | str = "median",
    num_permutations: int = 0,
    key: Array | None = None,
) -> MMD:
    r"""Unbiased squared maximum mean discrepancy with a Gaussian kernel.

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{1}{n(n-1)} Σ_{i≠j} k(x_i, x_j)
              + \frac{1}{m(m-1)} Σ_{i≠j} k(y_i, y_j) - \frac{2}{nm} Σ_{i,j} k(x_i, y_j),
              \qquad k(a, b) = \exp\!\big(-\lVert a - b \rVert^2 / (2σ^2)\big).

    Its expectation is ``MMD² ≥ 0``, zero iff the distributions agree (the estimate can be
    slightly negative). ``bandwidth="median"`` sets ``σ`` to the median pairwise distance of
    the pooled samples (Gretton et al., 2012). With ``num_permutations > 0`` the p-value of
    ``H0: same distribution`` is ``(1 + #{MMD²_perm ≥ MMD²}) / (1 + num_permutations)`` over
    random relabellings of the pooled samples. Cost ``O((n + m)²)`` memory and time per
    permutation.

    Args:
        x: ``[n, D]`` samples (e.g. real data).
        y: ``[m, D]`` samples (e.g. the model's).
        bandwidth: ``σ``, or ``"median"``.
        num_permutations: for the permutation p-value (needs ``key``).

    Example:
        >>> import jax, mcgrad as mg
        >>> x = jax.random.normal(jax.random.key(0), (500, 2))
        >>> y = jax.random.normal(jax.random.key(1), (500, 2))
        >>> same = mg.evaluation.mmd(x, y, num_permutations=100, key=jax.random.key(2))
        >>> shifted = mg.evaluation.mmd(x, y + 1.0, num_permutations=100, key=jax.random.key(2))
        >>> bool(same.p_value > 0.05), bool(shifted.p_value < 0.05), bool(shifted.mmd2 > 0.1)
        (True, True, True)
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    x, y = jnp.reshape(x, (x.shape[0], -1)), jnp.reshape(y, (y.shape[0], -1))
    num_x, num_y = x.shape[0], y.shape[0]
    if num_x < 2 or num_y < 2:
        raise ValueError(f"mmd() needs at least 2 samples on each side, got {num_x} and {num_y}.")
    if num_permutations > 0 and key is None:
        raise ValueError("mmd(num_permutations=...) needs a key.")
    median = bandwidth == "median"
    sigma = jnp.zeros(()) if median else jnp.asarray(bandwidth, jnp.float32)
    keys = jax.random.split(key, num_permutations) if num_permutations > 0 else None
    statistic, sigma, p_value = _mmd(x, y, sigma, keys, median)
    return MMD(statistic, sigma, p_value)


@jax.jit(static_argnames="median")
def _mmd(x: Array, y: Array, sigma: Array, keys: Array | None, median: bool) -> tuple[Array, Array, Array]:
    num_x, num_y = x.shape[0], y.shape[0]
    pooled = jnp.concatenate([x, y], axis=0)
    sigma = median_bandwidth(pooled) if median else sigma
    kernel = jnp.exp(-_squared_distances(pooled, pooled) / (2.0 * sigma**2))
    is_x = jnp.arange(num_x + num_y) < num_x
    statistic = _unbiased_mmd2(kernel, is_x, num_x, num_y)
    if keys is None:
        return statistic, sigma, jnp.asarray(jnp.nan)
    permuted = jax.lax.map(lambda k: _unbiased_mmd2(kernel, jax.random.permutation(k, is_x), num_x, num_y), keys)
    return statistic, sigma, (1.0 + jnp.sum(permuted >= statistic)) / (1.0 + keys.shape[0])


class ClassifierTest(NamedTuple):
    """Held-out ``accuracy`` of telling real from fake, its one-sided binomial ``p_value`` against
    0.5, and ``num_test`` held-out points."""

    accuracy: float
    p_value: float
    num_test: int


def _classifier(classifier: str | Any, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classifier == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if classifier == "mlp":
        return make_pipeline(
            StandardScaler(), MLPClassifier((64, 64), max_iter=500, early_stopping=True, random_state=seed)
        )
    if classifier == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(10))
    if isinstance(classifier, str):
        raise ValueError(f"unknown classifier '{classifier}': use 'logistic', 'mlp', 'knn' or a scikit-learn estimator.")
    return classifier


def classifier_two_sample_test(
    real: Array, fake: Array, classifier: str | Any = "logistic", test_fraction: float = 0.5, seed: int = 0
) -> ClassifierTest:
    r"""Classifier two-sample test (Lopez-Paz & Oquab, 2017): can a classifier tell real from fake?

    Label real ``1`` and fake ``0``, train ``classifier`` on a random ``1 − test_fraction``
    of the pooled points and score its accuracy ``â`` on the rest (``n`` points). Under
    ``H0: same distribution`` the number correct is ``Binomial(n, 1/2)``; the p-value is
    ``P(Binomial(n, 1/2) ≥ n·â)``. Accuracy near 0.5 means the samples are
    indistinguishable *to this classifier*: a linear ``"logistic"`` one sees only
    differences in the means; ``"mlp"`` or ``"knn"`` (or any scikit-learn estimator) see more.

    Example:
        >>> import numpy as np, mcgrad as mg
        >>> rng = np.random.default_rng(0)
        >>> same = mg.evaluation.classifier_two_sample_test(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)))
        >>> shifted = mg.evaluation.classifier_two_sample_test(rng.normal(size=(500, 2)), rng.normal(1.0, size=(500, 2)))
        >>> bool(abs(same.accuracy - 0.5) < 0.07), bool(shifted.accuracy > 0.7), bool(shifted.p_value < 1e-6)
        (True, True, True)
    """
    from scipy.stats import binomtest
    from sklearn.model_selection import train_test_split

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    points = np.concatenate([real.reshape(len(real), -1), fake.reshape(len(fake), -1)])
    labels = np.concatenate([np.ones(len(real), int), np.zeros(len(fake), int)])
    train_x, test_x, train_y, test_y = train_test_split(
        points, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    model = _classifier(classifier, seed).fit(train_x, train_y)
    correct = int(np.sum(model.predict(test_x) == test_y))
    p_value = binomtest(correct, len(test_y), 0.5, alternative="greater").pvalue
    return ClassifierTest(correct / len(test_y), float(p_value), len(test_y))


# --------------------------------------------------------------------------- mode coverage


class ModeCoverage(NamedTuple):
    """``num_covered`` of ``num_modes`` modes, the ``high_quality_fraction`` of samples within the
    radius of some mode, and per-mode ``counts`` of such samples."""

    num_covered: int
    num_modes: int
    high_quality_fraction: float
    counts: np.ndarray


def mode_coverage(samples: Array, modes: Array, radius: float, min_fraction: float | None = None) -> ModeCoverage:
    r"""How many known modes a sampler covers, and how many of its samples are good.

    A sample is *high quality* when it lies within ``radius`` of its nearest mode
    (commonly 3 standard deviations of the mode). Mode ``k`` is *covered* when at least
    ``min_fraction`` of all samples are high-quality samples nearest to it; the default
    ``1/(4K)`` asks for a quarter of a mode's fair share (Srivastava et al., 2017, count
    similarly).

    Example:
        >>> import numpy as np, mcgrad as mg
        >>> modes = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
        >>> rng = np.random.default_rng(0)
        >>> samples = modes[rng.integers(2, size=1000)] + 0.1 * rng.normal(size=(1000, 2))  # 2 of 3 modes
        >>> coverage = mg.evaluation.mode_coverage(samples, modes, radius=0.3)
        >>> coverage.num_covered, coverage.high_quality_fraction > 0.98, int(coverage.counts[2])
        (2, True, 0)
    """
    samples = np.asarray(samples, np.float64).reshape(len(samples), -1)
    modes = np.asarray(modes, np.float64).reshape(len(modes), -1)
    num_modes = len(modes)
    min_fraction = 1.0 / (4 * num_modes) if min_fraction is None else min_fraction
    distances = np.sqrt(((samples[:, None, :] - modes[None, :, :]) ** 2).sum(axis=-1))
    nearest = distances.argmin(axis=1)
    good = distances.min(axis=1) <= radius
    counts = np.bincount(nearest[good], minlength=num_modes)
    covered = int(np.sum(counts >= min_fraction * len(samples)))
    return ModeCoverage(covered, num_modes, float(good.mean()), counts)


# --------------------------------------------------------------------------- representations


class DownstreamAccuracy(NamedTuple):
    """Held-out ``accuracy`` of a logistic regression on the features, and the ``majority``
    accuracy of always predicting the most frequent training label."""

    accuracy: float
    majority: float


def downstream_accuracy(
    features: Array,
    labels: Array,
    test_features: Array | None = None,
    test_labels: Array | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> DownstreamAccuracy:
    r"""Evaluate learned representations on the end goal: classify labels from them.

    Fits a (standardized, L2-regularised) multinomial logistic regression on the training
    features and reports its accuracy on held-out features. Give the test set explicitly,
    or a random stratified ``test_fraction`` of ``features`` is held out.

    Example:
        >>> import numpy as np, mcgrad as mg
        >>> from models.data import iris
        >>> features, species = iris()
        >>> result = mg.evaluation.downstream_accuracy(features, species)
        >>> bool(result.accuracy > 0.85), bool(result.majority < 0.4)
        (True, True)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, np.float64).reshape(len(features), -1)
    labels = np.asarray(labels)
    if test_features is None:
        features, test_features, labels, test_labels = train_test_split(
            features, labels, test_size=test_fraction, random_state=seed, stratify=labels
        )
    test_features = np.asarray(test_features, np.float64).reshape(len(test_features), -1)
    test_labels = np.asarray(test_labels)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(features, labels)
    accuracy = float(np.mean(classifier.predict(test_features) == test_labels))
    values, counts = np.unique(labels, return_counts=True)
    majority = float(np.mean(test_labels == values[counts.argmax()]))
    return DownstreamAccuracy(accuracy, majority)
