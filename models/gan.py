"""GAN: an implicit generator fitted adversarially (mg.adversarial, non-saturating loss).

The generator is a NumPyro model with no likelihood: noise in a plate over the batch and
an MLP ``G_θ`` (an equinox module registered with ``eqx_module``) to a deterministic
output site::

    ε_i ~ N(0, I_k),     x_i = G_θ(ε_i),     i = 1 … B

A critic ``D_ψ`` (an equinox MLP) is trained by ``mg.adversarial`` to tell data from
``x``; the generator minimises ``−E log σ(D(G(ε)))`` (non-saturating, Goodfellow et al.
2014), its gradient going pathwise through the noise site. The critic judges packs of 4
samples (PacGAN, Lin et al. 2018; ``--pack 1`` turns it off): without packing this GAN
collapses onto at most 4 of the ring's 8 modes, with it it covers all 8. :mod:`models.wgan`
is the same generator with the Wasserstein loss and a gradient penalty.

``--estimator`` names the noise site's estimator; that distribution has no parameters,
so the generator's gradient is the chain rule through ``G_θ`` whichever is chosen. (The
choice matters in :mod:`models.discrete_gan`, whose output site is discrete.)

Data (``--data``):

* ``ring`` (default): 8 Gaussians (sd 0.05) on a circle of radius 2. Evaluation: mode
  coverage (a mode is covered when ≥ 1/32 of the samples lie within 3 sd of it; all 8
  is the goal, collapse shows as fewer), the fraction of high-quality samples, and the
  unbiased MMD² to held-out ring samples (median-heuristic bandwidth).
* ``digits``: continuous 8×8 digits in ``[0, 1]`` (sigmoid output). Evaluation: a
  classifier two-sample test (held-out digits against samples; accuracy near 0.5 means
  the classifier cannot tell them apart) and MMD².

    python -m models.gan
    python -m models.gan --data digits
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import eqx_module

import mcgrad as mg
from models import common, data

RING_SCALE = 0.05
RING_RADIUS = 2.0
NUM_MODES = 8


class Critic(eqx.Module):
    """An MLP critic mapping a batch ``[B, D]`` to scores ``[B]`` (logits, or critic values).

    With ``pack = m > 1`` the critic judges packs of ``m`` samples at once (PacGAN, Lin et
    al. 2018): consecutive samples are concatenated to ``[B/m, m·D]`` and each pack's score
    is given to all of its members. A collapsed generator gives packs with too little
    diversity, which the critic sees, so packing penalises mode collapse.
    """

    mlp: eqx.nn.MLP
    pack: int = eqx.field(static=True, default=1)

    def __call__(self, x):
        if self.pack == 1:
            return jax.vmap(self.mlp)(x)[:, 0]
        packs = jnp.reshape(x, (x.shape[0] // self.pack, self.pack * x.shape[1]))
        return jnp.repeat(jax.vmap(self.mlp)(packs)[:, 0], self.pack)


class Generator(eqx.Module):
    """The generator network and the NumPyro model that uses it."""

    net: eqx.nn.MLP
    noise_dim: int = eqx.field(static=True)
    output: str = eqx.field(static=True)  # "identity" (ring) or "sigmoid" (digits)

    def model(self, batch_size):
        net = eqx_module("generator", self.net)
        with numpyro.plate("batch", batch_size):
            noise = numpyro.sample("noise", dist.Normal(0.0, 1.0).expand([self.noise_dim]).to_event(1))
            out = jax.vmap(net)(noise)
            numpyro.deterministic("x", jax.nn.sigmoid(out) if self.output == "sigmoid" else out)

    def sample(self, params: dict, key: jax.Array, num_samples: int) -> jax.Array:
        """``num_samples`` draws of ``x`` with the fitted ``params``."""
        _, static = eqx.partition(self.net, eqx.is_inexact_array)
        net = eqx.combine(params["generator$params"], static)
        out = jax.vmap(net)(jax.random.normal(key, (num_samples, self.noise_dim)))
        return jax.nn.sigmoid(out) if self.output == "sigmoid" else out


def make_networks(
    data_dim: int, noise_dim: int, hidden: int, output: str, key: jax.Array, pack: int = 1
) -> tuple[Generator, Critic]:
    """Two-hidden-layer MLPs for the generator (``noise_dim → data_dim``) and the critic
    (``pack·data_dim → 1``)."""
    key_generator, key_critic = jax.random.split(key)
    generator = eqx.nn.MLP(noise_dim, data_dim, hidden, 2, activation=jax.nn.relu, key=key_generator)
    critic = eqx.nn.MLP(pack * data_dim, 1, hidden, 2, activation=jax.nn.leaky_relu, key=key_critic)
    return Generator(generator, noise_dim, output), Critic(critic, pack)


def load(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out data: ``ring`` (2-D) or ``digits`` (64-D, continuous)."""
    if name == "ring":
        train = data.ring_of_gaussians(4000, NUM_MODES, RING_RADIUS, RING_SCALE, seed=seed)
        test = data.ring_of_gaussians(1000, NUM_MODES, RING_RADIUS, RING_SCALE, seed=seed + 1000)
        return train, test
    if name == "digits":
        split = data.digits()
        return split.train, split.test
    raise ValueError(f"unknown data '{name}'; choose 'ring' or 'digits'.")


def evaluate(data_name: str, samples: np.ndarray, test: np.ndarray, key: jax.Array) -> dict:
    """Mode coverage and MMD² (ring), or the classifier two-sample test and MMD² (digits)."""
    out = {"mmd2": float(mg.evaluation.mmd(test, samples[: len(test)]).mmd2)}
    if data_name == "ring":
        coverage = mg.evaluation.mode_coverage(samples, data.ring_modes(NUM_MODES, RING_RADIUS), radius=3 * RING_SCALE)
        out.update(modes_covered=coverage.num_covered, high_quality_fraction=coverage.high_quality_fraction)
    else:
        test_result = mg.evaluation.classifier_two_sample_test(test, samples[: len(test)], classifier="mlp")
        out.update(c2st_accuracy=test_result.accuracy, c2st_p_value=test_result.p_value)
    return out


def figure(data_name: str, samples: np.ndarray, train: np.ndarray, losses: np.ndarray, critic_losses, title: str):
    """Ring: data and samples scattered over the modes; digits: a grid of samples; both with the losses."""
    fig, axes = common.new_figure(2, 1, size=4.0)
    ax = axes[0, 0]
    if data_name == "ring":
        ax.scatter(train[:1000, 0], train[:1000, 1], s=3, alpha=0.5, label="data")
        ax.scatter(samples[:1000, 0], samples[:1000, 1], s=3, alpha=0.5, label="generator")
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="center")
    else:
        ax.imshow(common.image_grid(samples[:50], num_cols=10), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    ax.set_title(title, fontsize=9)
    ax = axes[0, 1]
    ax.plot(losses, lw=0.5, label="generator loss")
    if critic_losses is not None:
        ax.plot(critic_losses, lw=0.5, label="critic loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def run(
    num_steps: int = 3000,
    seed: int = 0,
    estimator: str | None = "default",
    output_dir: str | None = None,
    progress_bar: bool = False,
    data: str = "ring",
    loss: str = "non_saturating",
    batch_size: int = 256,
    noise_dim: int = 8,
    hidden: int = 128,
    learning_rate: float = 1e-3,
    critic_learning_rate: float = 1e-3,
    critic_steps: int = 1,
    gradient_penalty: float = 10.0,
    pack: int = 4,
    num_eval_samples: int = 4000,
    name: str = "gan",
) -> dict:
    """Fit the generator with ``mg.adversarial(loss=loss)`` and evaluate its samples.

    Returns the metrics dict of :func:`models.common.metrics`: on the ring, ``metric`` is
    the number of modes covered (of 8) with ``mmd2`` and ``high_quality_fraction``; on the
    digits, ``metric`` is the classifier two-sample accuracy, with ``c2st_p_value`` and
    ``mmd2``.
    """
    if loss == "wasserstein" and gradient_penalty > 0 and pack > 1:
        raise ValueError(
            f"pack={pack} with the gradient penalty: the penalty scores single samples, so a packed "
            "critic cannot take it; use pack=1 (or gradient_penalty=0 with clip=...)."
        )
    data_name = data
    train, test = load(data_name, seed)
    key_init, key_fit, key_sample, key_eval = jax.random.split(jax.random.key(seed), 4)
    output = "identity" if data_name == "ring" else "sigmoid"
    generator, critic = make_networks(train.shape[1], noise_dim, hidden, output, key_init, pack)
    site_estimator = common.estimator_from_name(estimator)
    objective = mg.adversarial(
        critic,
        data=jnp.asarray(train),
        site="x",
        loss=loss,
        critic_optimizer=optax.adam(critic_learning_rate, b1=0.5, b2=0.9),
        critic_steps=critic_steps,
        gradient_penalty=gradient_penalty,
    )
    result, seconds = common.timed_fit(
        generator.model,
        None,
        batch_size,
        key=key_fit,
        num_steps=num_steps,
        optimizer=optax.adam(learning_rate, b1=0.5, b2=0.9),
        objective=objective,
        estimators=None if site_estimator is None else {"noise": site_estimator},
        progress_bar=progress_bar,
        diagnostics_every=0,
    )
    samples = np.asarray(generator.sample(result.params, key_sample, num_eval_samples))
    metrics_ = evaluate(data_name, samples, test, key_eval)
    if data_name == "ring":
        metric_name, metric = f"modes covered (of {NUM_MODES})", metrics_["modes_covered"]
    else:
        metric_name, metric = "classifier two-sample accuracy", metrics_["c2st_accuracy"]
    out = common.metrics(
        f"adversarial({loss})",
        estimator or "default",
        metric_name,
        metric,
        seconds,
        data=data_name,
        num_steps=num_steps,
        **metrics_,
    )
    if output_dir is not None:
        title = f"{name} on {data_name}: " + (
            f"{metrics_['modes_covered']}/8 modes, MMD² {metrics_['mmd2']:.2g}"
            if data_name == "ring"
            else f"C2ST accuracy {metrics_['c2st_accuracy']:.2f}, MMD² {metrics_['mmd2']:.2g}"
        )
        suffix = "" if data_name == "ring" else f"_{data_name}"
        fig = figure(data_name, samples, train, result.losses, None, title)
        out["figure"] = common.save_figure(fig, output_dir, f"{name}{suffix}")
    return out


def parser(doc: str, num_steps: int):
    """The command line shared by :mod:`models.gan` and :mod:`models.wgan`."""
    p = common.parser(doc, num_steps=num_steps, estimators=True)
    p.add_argument("--data", choices=("ring", "digits"), default="ring")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--critic-steps", type=int, default=None, help="critic updates per generator step")
    p.add_argument("--pack", type=int, default=None, help="samples per critic input (PacGAN; 1 = none)")
    return p


def main(argv=None):
    args = parser(__doc__, num_steps=3000).parse_args(argv)
    kwargs = common.run_kwargs(args)
    for flag in ("critic_steps", "pack"):
        if kwargs[flag] is None:
            kwargs.pop(flag)
    common.report("gan", run(**kwargs))


if __name__ == "__main__":
    main()
