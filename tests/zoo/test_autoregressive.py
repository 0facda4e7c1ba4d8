import jax
import jax.numpy as jnp
import numpy as np

from models import autoregressive
from tests.zoo._helpers import check_metrics


def test_smoke(tmp_path):
    metrics = autoregressive.run(num_steps=5, hidden=32, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)


def test_outputs_depend_only_on_earlier_pixels():
    """The autoregressive property: ∂ logit_d / ∂ x_j = 0 for j ≥ d."""
    masks = autoregressive.made_masks(6, 20)
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "input_to_hidden": jax.random.normal(keys[0], (6, 20)),
        "hidden_bias": jnp.zeros(20),
        "hidden_to_output": jax.random.normal(keys[1], (20, 6)),
        "direct": jax.random.normal(keys[2], (6, 6)),
        "output_bias": jnp.zeros(6),
    }
    jacobian = jax.jacobian(lambda x: autoregressive.made_logits(params, masks, x[None])[0])(
        jax.random.normal(keys[3], (6,))
    )
    np.testing.assert_array_equal(np.triu(np.asarray(jacobian)), 0.0)
    assert np.all(np.abs(np.tril(np.asarray(jacobian), -1))[1:].sum(axis=1) > 0)


def test_beats_the_factorized_bernoulli_baseline():
    metrics = autoregressive.run(num_steps=500)
    assert metrics["baseline"] - metrics["metric"] > 3.0  # nats per held-out image
