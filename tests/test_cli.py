"""The ``mcgrad`` command: the variance study end to end, and the subcommand registry."""

from __future__ import annotations

import argparse
import contextlib
import io
import math

import jax
import numpy as np
import pandas as pd
import pytest

import mcgrad as mg
from mcgrad import cli

NUM_SAMPLES = 2000
NUM_POINTS = 5
ESTIMATORS = ["score function", "score function + leave-one-out", "pathwise", "measure-valued (coupled)"]


def test_study_end_to_end(tmp_path):
    """One run of ``mcgrad study`` (one test, so that xdist runs it once), auto column included."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(
            ["study", "--output-dir", str(tmp_path), "--num-samples", str(NUM_SAMPLES), "--num-points", str(NUM_POINTS)]
        )
    assert code == 0

    # The figure and the tables.
    png = tmp_path / "variance_study.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(tmp_path / "variance_study.csv")
    for column in [
        "cost",
        "k",
        "estimator",
        "parameter",
        "mean",
        "variance",
        "evaluations_per_sample",
        "variance_x_evaluations",
        "exact_variance",
    ]:
        assert column in table.columns, column
    assert len(table) == len(ESTIMATORS) * 3 * NUM_POINTS * 2
    assert sorted(table["estimator"].unique()) == sorted(ESTIMATORS)
    assert sorted(table["cost"].unique()) == ["cosine", "exponential", "quadratic"]
    assert sorted(table["parameter"].unique()) == ["loc", "scale"]
    assert (table["variance"] > 0).all()
    winners = pd.read_csv(tmp_path / "winners.csv")
    assert set(winners["criterion"]) == {"variance", "variance_x_evaluations"}

    # Pathwise beats the score function on the quadratic, and leave-one-out helps there.
    quadratic = table[table["cost"] == "quadratic"].pivot_table(
        index=["parameter", "k"], columns="estimator", values="variance"
    )
    assert (quadratic["pathwise"] < quadratic["score function"]).all()
    assert (quadratic["score function + leave-one-out"] < quadratic["score function"]).all()

    # The paper's closed form: pathwise ∂μ of (x − k)² is 2(x − k), variance exactly 4
    # with standard error 4·sqrt(2/N).
    rows = table[(table["cost"] == "quadratic") & (table["estimator"] == "pathwise") & (table["parameter"] == "loc")]
    np.testing.assert_allclose(rows["variance"], 4.0, atol=5 * 4.0 * math.sqrt(2.0 / NUM_SAMPLES))
    np.testing.assert_allclose(rows["exact_variance"], 4.0)
    assert table.loc[table["cost"] != "quadratic", "exact_variance"].isna().all()

    # What mg.auto() picks (mg.select's numbers), against the exact ranking (quadratic) or
    # the one measured above.
    auto = pd.read_csv(tmp_path / "auto.csv")
    assert len(auto) == 3 * NUM_POINTS
    for column in ["cost", "k", "auto_choice", "best", "reference", "agrees", "gap", "auto_loss"]:
        assert column in auto.columns, column
    assert set(auto["auto_choice"]) <= set(ESTIMATORS) and set(auto["best"]) <= set(ESTIMATORS)
    assert (auto.loc[auto["cost"] == "quadratic", "reference"] == "exact").all()
    assert (auto.loc[auto["cost"] != "quadratic", "reference"] == "measured").all()
    efficiency = pd.DataFrame({name: 1.0 / (auto[f"variance[{name}]"] * auto[f"seconds[{name}]"]) for name in ESTIMATORS})
    assert (efficiency.idxmax(axis=1) == auto["auto_choice"]).all()
    assert (auto["agrees"] == (auto["auto_choice"] == auto["best"])).all()
    assert (auto["gap"] >= 0).all() and (auto.loc[auto["agrees"], "auto_loss"] == 0).all()
    quadratic = auto[auto["cost"] == "quadratic"]
    assert quadratic.loc[quadratic["gap"] > 0.2, "agrees"].all()  # the must-show, on the study's own run
    for name in ESTIMATORS:  # exact N-sample variances of the study's quadratic
        exact = [sum(cli.quadratic_exact_variance(name, p, k, num_samples=10) for p in ("loc", "scale")) for k in quadratic["k"]]
        np.testing.assert_allclose(quadratic[f"reference_variance[{name}]"], exact)
    # The variances are those mg.select measures with auto's key (common random numbers).
    k = float(quadratic["k"].iloc[0])
    selection = mg.select(
        lambda x: (x - k) ** 2, cli.study_distribution, cli.STUDY_POINT, key=jax.random.fold_in(jax.random.key(0), 1),
        candidates=cli.study_estimators(), num_samples=10, num_repeats=1000, num_timing_runs=1,
    )
    for name in ESTIMATORS:
        np.testing.assert_allclose(quadratic[f"variance[{name}]"].iloc[0], selection.table.loc[name, "total_variance"], rtol=1e-4)

    # What it prints.
    out = printed.getvalue()
    assert "Per-sample gradient variance" in out
    assert "Lowest variance:" in out and "Lowest variance × evaluations" in out
    assert "(x−k)², ∂/∂μ" in out
    assert "mg.auto()'s choice" in out and f"agrees at {int(quadratic['agrees'].sum())} of {NUM_POINTS} k (exact ranking)" in out
    assert "Where the best two differ by more than 20%" in out


def test_leave_one_out_excess():
    """The finite-N term of leave-one-out's variance: the quadratic's closed form, and for
    cos(kx) the closed moments E cos(kx) = cos(kμ)e^{−k²σ²/2}, E cos²(kx) = (1 + cos(2kμ)e^{−2k²σ²})/2."""
    num_samples = 10
    for k in [-3.0, 0.0, 2.5]:
        excess = cli.leave_one_out_excess(cli.STUDY_COSTS["quadratic"][1], k, num_samples)
        for parameter in ["loc", "scale"]:
            increment = cli.quadratic_exact_variance(
                "score function + leave-one-out", parameter, k, num_samples=num_samples
            ) - cli.quadratic_exact_variance("score function + leave-one-out", parameter, k) / num_samples
            np.testing.assert_allclose(excess[parameter], increment, rtol=1e-9)
    for k in [0.1, 1.0, 10.0]:  # μ = σ = 1
        mean = np.cos(k) * np.exp(-(k**2) / 2)
        variance = (1 + np.cos(2 * k) * np.exp(-2 * k**2)) / 2 - mean**2
        g_loc = -k * np.sin(k) * np.exp(-(k**2) / 2)  # ∂μ E cos(kx)
        excess = cli.leave_one_out_excess(cli.STUDY_COSTS["cosine"][1], k, num_samples)
        np.testing.assert_allclose(excess["loc"], (variance + g_loc**2) / (num_samples * (num_samples - 1)), rtol=1e-8)


def test_contiguous_runs_and_winners():
    assert cli.contiguous_runs([1, 2, 3], ["a", "b", "b"]) == [("a", 1, 1), ("b", 2, 3)]
    table = pd.DataFrame(
        {
            "cost": ["c"] * 6,
            "parameter": ["loc"] * 6,
            "k": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
            "estimator": ["a", "b"] * 3,
            "variance": [1.0, 2.0, 2.0, 1.0, 1.0, 1.01],
        }
    )
    winners = cli.study_winners(table)
    assert winners["estimator"].tolist() == ["a", "b", "a ≈ b"]


def test_register_a_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default="world")

    def run(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 3

    cli.register_command(cli.Command("hello", "say hello", add_arguments, run))
    assert cli.main(["hello", "--name", "you"]) == 3
    assert "hello you" in capsys.readouterr().out
    assert "study" in cli.COMMANDS


def test_no_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        cli.main([])


def test_compare_discrete_vae(tmp_path, capsys):
    """``mcgrad compare discrete-vae`` with tiny settings: the table (CSV and printed) and the PNG."""
    code = cli.main(
        ["compare", "discrete-vae", "--num-steps", "8", "--methods", "hand_disarm", "mcgrad_disarm",
         "--output-dir", str(tmp_path)]
    )
    assert code == 0
    table = pd.read_csv(tmp_path / "discrete_vae_comparison.csv").set_index("method")
    assert list(table.index) == ["hand_disarm", "mcgrad_disarm", "mcgrad_disarm_no_diagnostics"]
    for column in ["final -ELBO", "IWAE-100 (test, -bound)", "ms/step", "compile s", "time to target s",
                   "time to target / hand_disarm", "encoder variance @0", "encoder variance @8"]:
        assert column in table.columns, column
    assert (table["ms/step"] > 0).all() and (table["encoder variance @8"] > 0).all()
    assert table.loc["mcgrad_disarm", "evaluations per datum"] == 2
    assert (tmp_path / "discrete_vae_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Discrete VAE" in out and "mcgrad_disarm" in out
    with pytest.raises(SystemExit, match="multiple of 4"):
        cli.main(["compare", "discrete-vae", "--num-steps", "6"])
