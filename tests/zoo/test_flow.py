import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import data, flow
from tests.zoo._helpers import check_metrics


@pytest.mark.parametrize("data_name", ["moons", "digits"])
def test_smoke(tmp_path, data_name):
    metrics = flow.run(num_steps=3, data_name=data_name, num_couplings=2, width=16, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)


def test_coupling_inverts_and_its_log_det_matches_autodiff():
    masks = flow.coupling_masks(4, 2)
    net = flow.coupling_networks(4, 1, 8, 1, jax.random.key(0))[0]
    net = jax.tree.map(lambda a: a + 0.3 if isinstance(a, jax.Array) else a, net)  # leave the identity
    coupling = flow.AffineCoupling(masks[0], net)
    x = jax.random.normal(jax.random.key(1), (4,))
    y = coupling(x)
    np.testing.assert_allclose(coupling._inverse(y), x, atol=1e-5)
    log_det = jnp.linalg.slogdet(jax.jacobian(coupling)(x))[1]
    np.testing.assert_allclose(coupling.log_abs_det_jacobian(x, y), log_det, atol=1e-5)


def test_identity_couplings_give_exactly_the_bernoulli_baseline():
    """Before training the digits flow is the factorized Bernoulli model of the dequantized pixels."""
    split = data.binarized_digits()
    baseline = data.bernoulli_baseline(split.train, split.test)
    masks = flow.coupling_masks(64, 2)
    networks = flow.coupling_networks(64, 2, 16, 1, jax.random.key(0))
    probs_zero = jnp.asarray(1.0 - baseline.probs)
    params = {"probs_zero": probs_zero}
    params.update({f"coupling_{i}$params": flow.eqx.filter(net, flow.eqx.is_inexact_array) for i, net in enumerate(networks)})
    bound = flow.held_out_bound(flow.digits_model, params, jnp.asarray(split.test), masks, networks, probs_zero, num_noise_samples=2)
    assert bound == pytest.approx(baseline.test_nll, abs=1e-3)


def test_moons_density_beats_a_gaussian():
    metrics = flow.run(data_name="moons", num_steps=600, learning_rate=3e-3)
    assert metrics["metric"] < metrics["baseline"] - 0.5


@pytest.mark.slow
def test_digits_flow_beats_the_factorized_bernoulli_baseline():
    metrics = flow.run(data_name="digits", num_steps=600, width=128, learning_rate=3e-3)
    assert metrics["baseline"] - metrics["metric"] > 3.0  # nats per held-out image (an upper bound)
