"""Discrete VAE on binarized 8×8 digits: Bernoulli latents trained by DisARM, score function or measure-valued gradients.

The generative model (a one-layer sigmoid belief network with an MLP decoder ``f_θ``)::

    z_i ~ Π_l Bernoulli(½),  z_i ∈ {0, 1}^L,     x_i | z_i ~ Π_d Bernoulli(σ(f_θ(z_i)_d)),

and the amortized guide ``q_φ(z_i | x_i) = Π_l Bernoulli(σ(g_φ(x_i)_l))``, both in one
``numpyro.plate("data", N, subsample_size=B)`` (the model, guide and networks are
:mod:`mcgrad.experiments.discrete_vae`'s, shared with ``mcgrad compare discrete-vae``).
``z`` has no ``rsample``, so ``mg.elbo`` cannot go pathwise through it. The decoder's
gradient is exact given the samples; the encoder's is where the estimators differ:

* ``disarm`` (the default here): each particle is an antithetic pair ``b = 1[u < σ(φ)]``,
  ``b̃ = 1[1 − u < σ(φ)]`` and the encoder's estimate is
  ``½ (f(b̃) − f(b)) 1[b ≠ b̃] (−1)^b σ(|φ|)`` per datum — 2 model evaluations per particle;
* ``arm``: the same pair with ARM's weight ``(f(b̃) − f(b)) (u − ½)`` (never less variance);
* ``score_function`` (mcgrad's default for such a site): ``(L_i − b_i) ∇φ log q_φ(z_i | x_i)``
  with the leave-one-out baseline ``b_i`` over the ``M`` particles, Rao-Blackwellized so
  that each datum's score sees only its own learning signal;
* ``score_function_none``: the same without a baseline;
* ``moving_average``: the baseline is a running mean of past signals;
* ``measure_valued``: for each latent coordinate, ``L(z with z_l = 1) − L(z with z_l = 0)``
  (the Bernoulli weak derivative, common random numbers for everything else; one of the
  two is the particle itself) — ``L`` batched re-evaluations of the model per particle,
  so keep ``L`` small;
* ``straight_through_gumbel``: the straight-through Gumbel-softmax at temperature ½ —
  **biased** (the cost's gradient at the discrete value stands in for the relaxation's).

The script fits with ``--estimator``, reports the held-out IWAE-K bound, and then
measures each estimator's gradient variance at the *same* parameters (the fitted ones)
on one fixed minibatch from many independent keys: what swapping ``--estimator`` changes
is the variance (and the cost per step), not the expected gradient (except for the
biased straight-through estimator). ``--compare`` also fits with every estimator and
tabulates the held-out bounds side by side.

    python -m models.discrete_vae --estimator measure_valued
    python -m models.discrete_vae --compare
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

import mcgrad as mg
from mcgrad.experiments.discrete_vae import (  # noqa: F401  (re-exported: this module's public names)
    NUM_PIXELS,
    DiscreteVAE,
    initial_params,
    make_discrete_vae,
    network,
)
from models import common, data

DEFAULT_ESTIMATOR = "disarm"
ESTIMATORS = (
    "disarm",
    "arm",
    "score_function",
    "score_function_none",
    "moving_average",
    "measure_valued",
    "straight_through_gumbel",
)


def estimator_from_name(name: str) -> mg.GradientEstimator:
    """The estimator of the latent site ``z`` for each ``--estimator`` choice (``"default"``: DisARM)."""
    if name in ("disarm", "default"):
        return mg.disarm()
    if name == "arm":
        return mg.arm()
    if name == "straight_through_gumbel":
        return mg.gumbel_softmax(0.5, straight_through=True)
    if name == "score_function":
        return mg.score_function(baseline=mg.baselines.leave_one_out())
    if name == "score_function_none":
        return mg.score_function(baseline=mg.baselines.none())
    if name == "moving_average":
        return mg.score_function(baseline=mg.baselines.moving_average(0.9))
    if name == "measure_valued":
        return mg.measure_valued()
    raise ValueError(f"unknown estimator '{name}'; choose one of {ESTIMATORS}.")


def gradient_variance(
    vae: DiscreteVAE,
    params: dict,
    batch: jax.Array,
    estimator: mg.GradientEstimator,
    key: jax.Array,
    num_particles: int = 4,
    num_repeats: int = 64,
    num_warmup: int = 100,
) -> dict:
    r"""Variance of the ELBO gradient estimate at fixed ``params`` over ``num_repeats`` keys.

    The minibatch ``batch`` is fixed (no subsampling), so the only randomness is the guide's
    draws: the numbers compare estimators, not data noise. Returns the total variance (sum
    over coordinates) of the encoder's and the decoder's gradients, the encoder's mean SNR,
    and the seconds per estimate (compiled, the ``num_repeats`` estimates vectorised). Each
    estimate is ``mg.trainer(...).estimate`` at the same state with its own key. A stateful
    baseline (moving average) is first warmed up for ``num_warmup`` estimates at the same
    params, then held fixed.
    """
    args = (batch, None)
    training = mg.trainer(
        vae.model,
        vae.guide,
        *args,
        key=jax.random.key(0),
        objective=mg.elbo(num_particles),
        optimizer=optax.set_to_zero(),  # no step is taken: only `training.estimate` is used
        estimators={"z": estimator},
    )
    # The networks' weights are unconstrained parameters, so `params` is the state's own.
    state = training.init(jax.random.key(0))
    if jax.tree.structure(params) != jax.tree.structure(state.params):
        raise ValueError(
            "params must be shaped like FitResult.params of this VAE (see initial_params), got "
            f"{jax.tree.structure(params)}"
        )
    state = state._replace(params=params)
    key_warmup, key = jax.random.split(key)
    if jax.tree.leaves(state.objective_state):

        def warmup(objective_state, k):
            _, _, objective_state = training.estimate(state._replace(objective_state=objective_state), k, *args)
            return objective_state, None

        objective_state, _ = jax.jit(lambda s, ks: jax.lax.scan(warmup, s, ks))(
            state.objective_state, jax.random.split(key_warmup, num_warmup)
        )
        state = state._replace(objective_state=objective_state)

    def one(k):
        _, grads, _ = training.estimate(state, k, *args)
        return grads

    keys = jax.random.split(key, num_repeats)
    estimates = jax.jit(jax.vmap(one))
    grads = jax.block_until_ready(estimates(keys))
    start = time.perf_counter()
    jax.block_until_ready(estimates(keys))
    seconds = (time.perf_counter() - start) / num_repeats
    encoder = mg.gradient_statistics(grads["encoder$params"])
    decoder = mg.gradient_statistics(grads["decoder$params"])
    snr = np.concatenate([np.ravel(s) for s in jax.tree.leaves(encoder.snr)])
    return {
        "encoder_variance": float(encoder.total_variance),
        "decoder_variance": float(decoder.total_variance),
        "encoder_snr": float(np.nanmean(snr)),
        "seconds_per_estimate": seconds,
    }


def compare_variances(vae, params, batch, key, num_particles=4, num_repeats=64, names=ESTIMATORS) -> pd.DataFrame:
    """:func:`gradient_variance` of every estimator at the same params, batch and keys."""
    rows = {
        name: gradient_variance(vae, params, batch, estimator_from_name(name), key, num_particles, num_repeats)
        for name in names
    }
    return pd.DataFrame(rows).T


def figure(vae: DiscreteVAE, params: dict, test: np.ndarray, losses: np.ndarray, key: jax.Array):
    """Training loss, held-out digits, reconstructions and samples from the prior."""
    encoder, decoder = network(vae, params, "encoder"), network(vae, params, "decoder")
    originals = test[:20]
    probs = jax.nn.sigmoid(jax.vmap(encoder)(jnp.asarray(originals)))
    codes = (probs > 0.5).astype(jnp.float32)
    reconstructions = jax.nn.sigmoid(jax.vmap(decoder)(codes))
    prior = jax.random.bernoulli(key, 0.5, (20, vae.latent_dim)).astype(jnp.float32)
    samples = jax.nn.sigmoid(jax.vmap(decoder)(prior))
    fig, axes = common.new_figure(4, 1, size=3.4)
    ax = axes[0, 0]
    steps = np.arange(len(losses))
    window = max(1, len(losses) // 50)
    smooth = pd.Series(losses).rolling(window, min_periods=1).mean()
    ax.plot(steps, smooth)
    ax.set_xlabel("step")
    ax.set_ylabel("−ELBO (minibatch, smoothed)")
    ax.set_title("training")
    for ax, images, title in zip(
        axes[0, 1:], (originals, reconstructions, samples), ("held-out digits", "reconstructions (mode of q)", "samples from p(z)")
    ):
        ax.imshow(common.image_grid(np.asarray(images), num_cols=5), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    return fig


def fit(vae, train, estimator: str, key, num_steps, batch_size, num_particles, learning_rate, progress_bar):
    """``mg.fit`` of the discrete VAE with the named estimator on ``z``."""
    return common.timed_fit(
        vae.model,
        vae.guide,
        jnp.asarray(train),
        batch_size,
        key=key,
        num_steps=num_steps,
        optimizer=optax.adam(learning_rate),
        objective=mg.elbo(num_particles),
        estimators={"z": estimator_from_name(estimator)},
        progress_bar=progress_bar,
        diagnostics_every=max(1, num_steps // 20),
    )


def held_out_bound(vae, params, test, key, num_samples):
    return float(mg.evaluation.iwae_bound(vae.model, vae.guide, params, jnp.asarray(test), None, key=key, num_samples=num_samples).mean)


def run(
    num_steps: int = 2000,
    seed: int = 0,
    estimator: str = DEFAULT_ESTIMATOR,
    output_dir: str | None = None,
    progress_bar: bool = False,
    latent_dim: int = 8,
    hidden: int = 64,
    batch_size: int = 32,
    num_particles: int = 4,
    learning_rate: float = 3e-3,
    num_eval_samples: int = 100,
    num_repeats: int = 64,
    variance_estimators: tuple[str, ...] | None = ESTIMATORS,
) -> dict:
    """Fit with ``estimator``, evaluate the held-out bound, compare gradient variances.

    Returns the metrics dict of :func:`models.common.metrics` (``metric``: held-out negative
    IWAE-K bound in nats per image; ``baseline``: the factorized Bernoulli NLL) plus
    ``initial_nll_bound`` (the same bound at the initial parameters), ``training_variance``
    (the encoder's gradient variance recorded by ``mg.fit``, mean over the run), and, for
    each name in ``variance_estimators``, ``variance_<name>`` (total encoder gradient
    variance at the fitted params) and ``seconds_<name>`` (per estimate).
    """
    estimator = DEFAULT_ESTIMATOR if estimator in (None, "default") else estimator
    split = data.binarized_digits()
    key_init, key_fit, key_eval, key_variance, key_figure = jax.random.split(jax.random.key(seed), 5)
    vae = make_discrete_vae(latent_dim, hidden, key_init)
    initial = held_out_bound(vae, initial_params(vae), split.test, key_eval, num_eval_samples)
    result, seconds = fit(
        vae, split.train, estimator, key_fit, num_steps, batch_size, num_particles, learning_rate, progress_bar
    )
    bound = held_out_bound(vae, result.params, split.test, key_eval, num_eval_samples)
    baseline = data.bernoulli_baseline(split.train, split.test)
    training_variance = result.diagnostics.variance.get("encoder$params", np.zeros(0))
    metrics = common.metrics(
        "elbo",
        estimator,
        f"test NLL bound (IWAE-{num_eval_samples}, nats)",
        -bound,
        seconds,
        baseline=baseline.test_nll,
        baseline_name="factorized Bernoulli",
        initial_nll_bound=-initial,
        training_variance=float(np.mean(training_variance)) if training_variance.size else float("nan"),
        num_steps=num_steps,
        latent_dim=latent_dim,
        num_particles=num_particles,
    )
    if variance_estimators:
        batch = jnp.asarray(split.train[:batch_size])
        table = compare_variances(vae, result.params, batch, key_variance, num_particles, num_repeats, variance_estimators)
        for name, row in table.iterrows():
            metrics[f"variance_{name}"] = float(row["encoder_variance"])
            metrics[f"seconds_{name}"] = float(row["seconds_per_estimate"])
    if output_dir is not None:
        fig = figure(vae, result.params, split.test, result.losses / split.train.shape[0], key_figure)
        name = "discrete_vae" if estimator == DEFAULT_ESTIMATOR else f"discrete_vae_{estimator}"
        metrics["figure"] = common.save_figure(fig, output_dir, name)
    return metrics


def compare(num_steps: int = 2000, seed: int = 0, progress_bar: bool = False, **kwargs) -> pd.DataFrame:
    """Fit once per estimator (same seed, same init) and tabulate bound, time and variance."""
    rows = {}
    for name in ESTIMATORS:
        m = run(num_steps=num_steps, seed=seed, estimator=name, progress_bar=progress_bar, variance_estimators=None, **kwargs)
        rows[name] = {
            "test NLL bound": m["metric"],
            "initial bound": m["initial_nll_bound"],
            "fit seconds": m["fit_seconds"],
            "training variance (encoder)": m["training_variance"],
        }
    return pd.DataFrame(rows).T


def main(argv=None):
    parser = common.parser(__doc__, num_steps=2000)
    parser.add_argument("--estimator", choices=ESTIMATORS, default=DEFAULT_ESTIMATOR, help="estimator of the latent z")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-particles", type=int, default=4)
    parser.add_argument("--compare", action="store_true", help="also fit with every estimator and tabulate")
    args = parser.parse_args(argv)
    kwargs = common.run_kwargs(args)
    do_compare = kwargs.pop("compare")
    metrics = run(**kwargs)
    common.report("discrete_vae", metrics)
    print(
        f"\nGradient variance of the encoder at the fitted params (fixed minibatch, {args.num_particles} particles):"
    )
    reference = metrics.get("variance_score_function_none")
    for name in ESTIMATORS:
        variance = metrics.get(f"variance_{name}")
        if variance is not None:
            ratio = f"  ({variance / reference:.3g}× no baseline)" if reference else ""
            print(f"  {name:22s} {variance:10.4g}{ratio}  {1e3 * metrics[f'seconds_{name}']:.1f} ms/estimate")
    print(
        "Swapping --estimator changes the variance of the encoder's gradient (and the cost per step): all but "
        "straight_through_gumbel are unbiased, so with enough steps they reach similar bounds; lower variance gets "
        "there in fewer steps."
    )
    if do_compare:
        kwargs.pop("estimator")
        kwargs.pop("output_dir")
        print(compare(**kwargs).to_string())


if __name__ == "__main__":
    main()
