"""Built-in data sets of the model zoo (no downloads: scikit-learn's bundled data).

Every function is deterministic given its ``seed`` and returns ``float32`` numpy arrays.

* :func:`binarized_digits` — 8×8 digits, pixels ``x/16 > 0.5`` → 64 binary pixels, a
  fixed 80/20 train/test split (1437 / 360 images).
* :func:`digits` — the same split, continuous pixels ``x/16 ∈ [0, 1]``.
* :func:`ring_of_gaussians` — a mixture of 8 Gaussians on a circle (mode coverage).
* :func:`two_moons` — ``sklearn.datasets.make_moons``.
* :func:`iris` — 150 × 4 measurements and 3 species labels, standardized.
* :func:`bernoulli_baseline` — the factorized Bernoulli model with Laplace smoothing,
  the baseline NLL of every density model of binarized digits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0


class Split(NamedTuple):
    """A train/test split with labels (``-1`` where a data set has none)."""

    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray


def _digits_split(pixels: np.ndarray, labels: np.ndarray) -> Split:
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(pixels))
    test, train = order[:DIGITS_NUM_TEST], order[DIGITS_NUM_TEST:]
    return Split(pixels[train], pixels[test], labels[train], labels[test])


def digits() -> Split:
    """8×8 digits with continuous pixels ``x/16 ∈ [0, 1]``, shape ``[N, 64]``; the fixed split.

    Example:
        >>> split = digits()
        >>> split.train.shape, split.test.shape, float(split.train.max())
        ((1437, 64), (360, 64), 1.0)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _digits_split((bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32))


def binarized_digits() -> Split:
    """8×8 digits binarized by ``x/16 > 0.5``: 64 pixels in ``{0, 1}``; the fixed split of :func:`digits`.

    Example:
        >>> split = binarized_digits()
        >>> split.train.shape, sorted(set(split.train.ravel().tolist()))
        ((1437, 64), [0.0, 1.0])
    """
    split = digits()
    return split._replace(train=(split.train > 0.5).astype(np.float32), test=(split.test > 0.5).astype(np.float32))


def ring_modes(num_modes: int = 8, radius: float = 2.0) -> np.ndarray:
    """The ``[num_modes, 2]`` centres ``radius·(cos 2πk/K, sin 2πk/K)`` of :func:`ring_of_gaussians`."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    return (radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)


def ring_of_gaussians(
    num_samples: int = 2000, num_modes: int = 8, radius: float = 2.0, scale: float = 0.05, seed: int = 0
) -> np.ndarray:
    """Samples ``[num_samples, 2]`` of an equal-weight mixture of ``N(μ_k, scale² I)``, ``μ_k`` on a circle.

    Example:
        >>> ring_of_gaussians(100).shape
        (100, 2)
    """
    rng = np.random.default_rng(seed)
    modes = ring_modes(num_modes, radius)
    which = rng.integers(num_modes, size=num_samples)
    return (modes[which] + scale * rng.standard_normal((num_samples, 2))).astype(np.float32)


def two_moons(num_samples: int = 2000, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.make_moons``: points ``[num_samples, 2]`` and their moon labels.

    Example:
        >>> points, labels = two_moons(100)
        >>> points.shape, labels.shape
        ((100, 2), (100,))
    """
    from sklearn.datasets import make_moons

    points, labels = make_moons(num_samples, noise=noise, random_state=seed)
    return points.astype(np.float32), labels.astype(np.int32)


def iris(standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Iris: features ``[150, 4]`` (standardized to zero mean, unit variance by default), species ``[150]``.

    Example:
        >>> features, species = iris()
        >>> features.shape, sorted(set(species.tolist()))
        ((150, 4), [0, 1, 2])
    """
    from sklearn.datasets import load_iris

    bunch = load_iris()
    features = bunch.data
    if standardize:
        features = (features - features.mean(axis=0)) / features.std(axis=0)
    return features.astype(np.float32), bunch.target.astype(np.int32)


class BernoulliBaseline(NamedTuple):
    """The factorized Bernoulli model: pixel probabilities and the held-out NLL (nats per image)."""

    probs: np.ndarray
    train_nll: float
    test_nll: float


def bernoulli_baseline(train: np.ndarray, test: np.ndarray, pseudocount: float = 1.0) -> BernoulliBaseline:
    r"""The factorized Bernoulli model ``p(x) = Π_d p_d^{x_d} (1 − p_d)^{1 − x_d}`` by closed form.

    Laplace smoothing: ``p_d = (Σ_i x_{id} + α) / (N + 2α)``. The NLL is
    ``−(1/N) Σ_i log p(x_i)`` in nats per image: the baseline every density model of
    binarized digits has to beat.

    Example:
        >>> split = binarized_digits()
        >>> baseline = bernoulli_baseline(split.train, split.test)
        >>> 20 < baseline.test_nll < 30
        True
    """
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    probs = (train.sum(axis=0) + pseudocount) / (len(train) + 2 * pseudocount)

    def nll(x):
        return float(-np.mean(x @ np.log(probs) + (1 - x) @ np.log1p(-probs)))

    return BernoulliBaseline(probs.astype(np.float32), nll(train), nll(test))
