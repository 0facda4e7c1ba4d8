import pytest

from models import wgan
from tests.zoo._helpers import check_metrics, run_as_users_do


def test_smoke(tmp_path):
    metrics = wgan.run(num_steps=3, critic_steps=2, batch_size=32, hidden=16, num_eval_samples=200, output_dir=tmp_path)
    check_metrics(metrics, tmp_path)
    assert metrics["objective"] == "adversarial(wasserstein)"
    assert metrics["figure"].endswith("wgan.png")


def test_cli_passes_its_flags_to_run(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"metric_name": "m", "metric": 8, "fit_seconds": 0.0}

    monkeypatch.setattr(wgan, "run", fake_run)
    wgan.main(["--critic-steps", "2", "--num-steps", "4"])
    assert seen["critic_steps"] == 2 and seen["num_steps"] == 4 and seen["data"] == "ring"


@pytest.mark.slow
def test_covers_the_ring():
    # The model's defaults (2000 steps, seed 0), compiled as a user's run is. A GAN's mode
    # count follows the program's rounding: under the suite's LLVM level 0 this run covered
    # 7 modes and, after a change to mg.fit's loop that is the same up to rounding, 6; with
    # the default flags 8 (seed 1: 7), the run docs/models.md reports. 1000 steps gave 5, 0
    # and 8 for seeds 0, 1, 2, so a shorter run is not a reliable check.
    metrics = run_as_users_do("wgan")
    assert metrics["modes_covered"] >= 7, metrics
    assert metrics["mmd2"] < 0.01
