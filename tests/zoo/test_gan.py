import pytest

from models import gan
from tests.zoo._helpers import check_metrics, run_as_users_do


@pytest.mark.parametrize("data", ["ring", "digits"])
def test_smoke(tmp_path, data):
    metrics = gan.run(num_steps=5, batch_size=32, hidden=16, num_eval_samples=200, data=data, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)
    assert ("modes_covered" in metrics) == (data == "ring")
    assert ("c2st_accuracy" in metrics) == (data == "digits")


def test_cli_passes_its_flags_to_run(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"metric_name": "m", "metric": 8, "fit_seconds": 0.0, "mmd2": 0.0}

    monkeypatch.setattr(gan, "run", fake_run)
    gan.main(["--data", "digits", "--num-steps", "3", "--pack", "2"])
    assert seen["data"] == "digits" and seen["num_steps"] == 3 and seen["pack"] == 2
    assert "critic_steps" not in seen  # not given: run's default
    assert "mmd2" in capsys.readouterr().out


def test_packed_critic_scores_packs():
    import jax
    import jax.numpy as jnp

    _, critic = gan.make_networks(2, 4, 8, "identity", jax.random.key(0), pack=4)
    scores = critic(jnp.ones((8, 2)))
    assert scores.shape == (8,)
    assert jnp.all(scores[:4] == scores[0]) and jnp.all(scores[4:] == scores[4])


def test_wasserstein_penalty_rejects_a_packed_critic():
    with pytest.raises(ValueError, match="pack"):
        gan.run(num_steps=1, loss="wasserstein", pack=2)


@pytest.mark.slow
def test_covers_the_ring():
    # Without the packed critic this GAN collapses onto at most 4 modes; with it, all 8.
    # Compiled as a user's run is (a GAN's mode count follows the program's rounding; see
    # test_wgan.py).
    metrics = run_as_users_do("gan")
    assert metrics["modes_covered"] >= 7, metrics
    assert metrics["high_quality_fraction"] > 0.5
    assert metrics["mmd2"] < 0.01
