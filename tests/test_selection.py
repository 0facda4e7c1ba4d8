"""mg.auto() in fits (mcgrad/selection.py): decisions, records, state, resume, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import mcgrad as mg
from mcgrad.estimators.choice import AutoState
from mcgrad.selection import (
    LATE_GRADIENT,
    Measurement,
    choices_in,
    decide,
    efficiency,
    estimate_counts,
    outpaced,
    progress,
    program_cost,
    relative_variances,
    counted_seconds,
    standard_errors,
    merged,
    upstream_mask,
)


def gaussian_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gaussian_guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


def mixed_model(x):
    """A continuous global shift and a discrete label per datum."""
    shift = numpyro.sample("shift", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        label = numpyro.sample("label", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(shift + 3.0 * label, 1.0), obs=x)


def mixed_guide(x):
    loc = numpyro.param("shift_loc", 0.0)
    scale = numpyro.param("shift_scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("shift", dist.Normal(loc, scale))
    logits = numpyro.param("label_logits", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("label", dist.Bernoulli(logits=logits))


DATA = jnp.array([-0.3, 0.2, 2.8, 3.4, 0.1, 3.1])


def assert_the_rule_chose(choices, margin=0.1, confidence=2.0, first=("pathwise", "measure_valued")):
    """Each recorded choice is :func:`decide`'s on that decision's measured rows, from the
    choice before it (before step 0 mg.fit's default: the first of ``first`` offered at the
    site, else its first candidate; these tests fit a Normal site, or labels drawn once per
    plate slice, which the default sums over)."""
    for site, rows in choices.groupby("site", sort=False):
        names = tuple(dict.fromkeys(rows["candidate"]))
        current = next((names.index(name) for name in first if name in names), 0)
        for _, panel in rows.groupby("step"):
            measured = panel[panel["measured"]].set_index("candidate")
            expected = decide(current, names, measured["efficiency"].to_dict(), margin,
                              measured["efficiency_error"].to_dict(), confidence)
            chosen = panel.loc[panel["chosen"], "candidate"]
            assert list(chosen) == [names[expected]], (site, panel)
            current = expected


def fit(model, guide, estimators, num_steps=40, objective=None, **options):
    return mg.fit(model, guide, DATA, key=jax.random.key(0), num_steps=num_steps, optimizer=optax.adam(0.05),
                  objective=objective or mg.elbo(2), estimators=estimators, progress_bar=False, **options)


def assert_the_ledger_afforded(choices, budget=0.05):
    """Each recorded decision after the first was :func:`affordable` by the ledger on its rows:
    the decisions before it, and the last of them once more (its expected cost), took at
    most ``budget`` of the seconds the run had taken."""
    ledger = choices.groupby("step")[["decision_seconds", "run_seconds"]].agg(["min", "max"])
    for column in ("decision_seconds", "run_seconds"):  # one value per decision, on all its rows
        assert (ledger[(column, "min")] == ledger[(column, "max")]).all()
    decisions = ledger.xs("min", axis=1, level=1)
    assert decisions["run_seconds"].iloc[0] == 0.0 and decisions["run_seconds"].is_monotonic_increasing
    spent_before = decisions["decision_seconds"].cumsum().shift(fill_value=0.0)
    expected = decisions["decision_seconds"].shift(fill_value=0.0)
    assert (spent_before + expected <= budget * decisions["run_seconds"]).all(), decisions


def time_alone(entry, state, keys, first, array_inputs):
    """One program's timing, its calls one after another (no other candidate in turn)."""
    from mcgrad import selection

    return selection._interleaved({None: selection._timing(entry, state, keys, first, array_inputs)})[0][None]


def test_every_latent_site_is_chosen_and_the_choices_are_recorded():
    # An unlimited budget: every decision of the default schedule is made.
    everywhere = functools.partial(mg.auto, budget=math.inf)
    result = fit(mixed_model, mixed_guide, {"shift": everywhere(), "label": everywhere()}, num_steps=40,
                 diagnostics_every=10)
    choices = result.diagnostics.choices
    assert set(choices["site"]) == {"shift", "label"}
    assert sorted(choices["step"].unique()) == [0, 2, 10, 20, 30]  # a quarter of the run, and a sixteenth
    # one chosen candidate per site and decision: the rule's, on the recorded rows
    chosen = choices[choices["chosen"]]
    assert chosen.groupby(["step", "site"]).size().eq(1).all()
    assert_the_rule_chose(choices)
    first = choices[(choices["step"] == 0)]
    assert (first.loc[first["num_estimates"] > 1, "efficiency_error"] > 0).all()
    # ranked by the whole step's progress a second: the site's, and the other site's
    # coordinates' (one number per decision and site, the same for every candidate)
    # (measured here: a pruned row keeps an earlier decision's numbers, a ceiling has none)
    measured = choices[choices["measured"] & choices["progress"].notna()]
    shared = measured.groupby(["step", "site"])["shared_progress"]
    assert shared.nunique().eq(1).all() and (measured["shared_progress"] >= 0).all()
    # positive at the start; later a converged site's gradient can be within its own noise
    # (no signal left to make progress on)
    assert (measured.loc[measured["step"] == 0, "shared_progress"] > 0).all()
    np.testing.assert_allclose(measured["efficiency"],
                               (measured["progress"] + measured["shared_progress"]) / measured["seconds"], rtol=1e-6)
    # seconds as ranked: a power of each program's work (XLA's counts) at the timings'
    # level, each row's own timing beside it
    counts = ["flops", "transcendentals", "bytes_accessed"]
    assert (choices.loc[choices["measured"], counts] > 0).all().all()
    for _, panel in choices[choices["measured"]].groupby(["step", "site"]):
        panel = panel.set_index("candidate")
        priced = counted_seconds(panel["timed_seconds"].to_dict(),
                                   {c: tuple(row) for c, row in panel[counts].iterrows()})
        np.testing.assert_allclose(panel["seconds"], [priced[c] for c in panel.index], rtol=1e-9)
    # the continuous site offers pathwise, the discrete one the discrete estimators
    assert "pathwise" in set(first[first["site"] == "shift"]["candidate"])
    assert {"disarm", "score_function_loo"} <= set(first[first["site"] == "label"]["candidate"])
    assert "pathwise" not in set(first[first["site"] == "label"]["candidate"])
    # the state records the last choice, and the fit trained
    last = chosen[chosen["step"] == 30].set_index("site")["candidate"]
    names = {"shift": list(first[first["site"] == "shift"]["candidate"]),
             "label": list(first[first["site"] == "label"]["candidate"])}
    stored = choices_in(result.state.objective_state)
    assert {site: names[site][index] for site, index in stored.items()} == dict(last)
    assert np.all(np.isfinite(result.losses)) and result.losses[-5:].mean() < result.losses[:5].mean()
    assert result.diagnostics.steps.tolist() == [0, 10, 20, 30]  # the gradient diagnostics still run


def test_the_default_schedule_decides_where_the_run_has_paid_for_its_measurements():
    # The same 40 steps with the default budget (5%): a decision takes milliseconds, the
    # whole run about as long, so later decisions are made only where the ledger affords them.
    result = fit(mixed_model, mixed_guide, "auto", num_steps=40)
    choices = result.diagnostics.choices
    assert set(choices["step"]) <= {0, 2, 10, 20, 30} and choices["step"].min() == 0
    assert (choices["decision_seconds"] > 0).all()
    assert_the_ledger_afforded(choices)
    assert_the_rule_chose(choices)
    # A budget no run can pay: the first decision only, and the run continues on its choice.
    frugal = fit(mixed_model, mixed_guide, {"label": mg.auto(budget=1e-9)}, num_steps=40)
    assert set(frugal.diagnostics.choices["step"]) == {0} and len(frugal.losses) == 40
    # A user's `every` is kept as given, whatever the budget.
    scheduled = fit(mixed_model, mixed_guide, {"label": mg.auto(budget=1e-9, every=10)}, num_steps=40)
    assert sorted(scheduled.diagnostics.choices["step"].unique()) == [0, 10, 20, 30]


def test_a_discrete_site_chooses_a_lower_variance_estimator_than_the_score_function():
    # Ranked by variance: progress saturates at 1 a coordinate, so on six labels the score
    # function's 0.6 a coordinate against enumeration's 0.94 is a 1.6x gap, within the timing
    # noise of a 60 us estimate under the suite's load (CI once chose the score function by
    # it). The variances differ 4-14x. Both columns are recorded whatever is ranked.
    # No budget limit, 40 estimates of the fastest (the slower ones fewer: timings of tens of
    # microseconds under load can give one 10x fewer): a switch must be sure beyond the noise
    # of the variances (mg.auto's confidence), and an 8-step run's share, 2 estimates, is not.
    estimators = {"label": mg.auto(criterion="variance", budget=math.inf, num_estimates=40)}
    result = fit(mixed_model, mixed_guide, estimators, num_steps=8)
    choices = result.diagnostics.choices
    first = choices[choices["step"] == 0].set_index("candidate")
    for better in ("enumerate", "measure_valued", "disarm"):
        assert first.loc[better, "variance"] < first.loc["score_function_loo", "variance"] / 2
        assert first.loc[better, "progress"] > first.loc["score_function_loo", "progress"]
    # It leaves the score function for a candidate of lower variance; which one rests on
    # timings of a few microseconds an estimate under the suite's load (REBAR, with about
    # half the score function's variance, won once in CI: 3.1 against 5.0).
    chosen = first.index[first["chosen"]][0]
    assert chosen != "score_function_loo"
    assert first.loc[chosen, "variance"] < first.loc["score_function_loo", "variance"]


def test_user_candidates_a_custom_schedule_and_annotations():
    def annotated_guide(x):
        loc = numpyro.param("loc", 5.0)
        numpyro.sample("z", dist.Normal(loc, 1.0),
                       infer={"estimator": mg.auto(candidates={"sf": mg.score_function(), "pw": mg.pathwise()}, every=5,
                                                   criterion="variance", num_estimates=200, budget=math.inf)})

    result = fit(gaussian_model, annotated_guide, None, num_steps=12)
    choices = result.diagnostics.choices
    assert sorted(choices["step"].unique()) == [0, 5, 10]
    assert set(choices["candidate"]) == {"sf", "pw"}
    # Started 3.7 posterior sds from the mean (12 Adam steps of 0.05 stay there), the score
    # function's variance is 70-210x pathwise's (12 fits). The slower-timed candidate gets
    # fewer estimates, and timings of microseconds made one look 25x slower (2 of the
    # fastest's 50 estimates: a 1-dof variance, which can fall under the 10x bar); of 200,
    # it keeps at least 8.
    first = choices[choices["step"] == 0].set_index("candidate")
    assert first.loc["sf", "raw_variance"] > 10 * first.loc["pw", "raw_variance"]
    # Ranked by 1/(variance x seconds), the user's criterion, and the choice is the rule's on
    # the measured rows. Which one that is rests on the seconds too: these estimates take
    # microseconds, which the suite's load can move by more than the gap (CI once chose the
    # score function), so the test asserts the rule, not the winner.
    measured = choices[choices["measured"]]
    np.testing.assert_allclose(measured["efficiency"], 1 / (measured["variance"] * measured["seconds"]), rtol=1e-6)
    assert_the_rule_chose(choices)


def test_resuming_keeps_the_choice_and_matches_an_unbroken_run(tmp_path):
    estimators = {"z": mg.auto(candidates={"sf": mg.score_function(), "pw": mg.pathwise()}, margin=0.0)}
    whole = fit(gaussian_model, gaussian_guide, estimators, num_steps=20)
    first = fit(gaussian_model, gaussian_guide, estimators, num_steps=10, checkpoint_path=tmp_path / "run.ckpt")
    assert isinstance(first.state.objective_state["z"], AutoState)
    resumed = fit(gaussian_model, gaussian_guide, estimators, num_steps=20, resume_from=tmp_path / "run.ckpt")
    assert len(resumed.losses) == 20
    np.testing.assert_allclose(resumed.losses[:10], first.losses)
    def chosen(result):
        choices = result.diagnostics.choices
        return set(choices.loc[choices["chosen"], "candidate"])

    # Decisions rest on measured seconds, so runs can choose otherwise under load; pathwise
    # throughout, in every run, gives the same trajectory, bit for bit.
    if chosen(whole) == chosen(first) == chosen(resumed) == {"pw"}:
        np.testing.assert_array_equal(resumed.losses, whole.losses)


def test_a_repeated_short_fit_decides_at_step_0_on_every_candidate():
    # A repeated fit times each candidate on one estimate (its programs ran before); a
    # 10-step run's budget then leaves every candidate at the 2-estimate floor, and all of
    # them once waited on a best that none had measured: step 0 went unrecorded, and ran
    # the first candidate.
    estimators = {"z": mg.auto(candidates={"sf": mg.score_function(), "pw": mg.pathwise()})}
    seconds = []
    for _ in range(2):
        result = fit(gaussian_model, gaussian_guide, estimators, num_steps=10)
        choices = result.diagnostics.choices
        first = choices[choices["step"] == 0]
        assert set(first["candidate"]) == {"sf", "pw"} and first["measured"].all()
        assert first["chosen"].sum() == 1
        assert np.isfinite(first.loc[first["num_estimates"] > 1, "efficiency"]).all()
        seconds.append(choices.groupby("candidate")["seconds"].min())
    # A program keeps its fastest timing: the second fit starts from the first's, so no
    # candidate looks dearer on the noise of one more timing.
    assert (seconds[1] <= seconds[0]).all()


def test_auto_in_a_trainer_runs_the_default_candidate_with_every_candidates_state():
    training = mg.trainer(mixed_model, mixed_guide, DATA, key=jax.random.key(0), objective=mg.elbo(2),
                          optimizer=optax.adam(0.05), estimators="auto")
    # What mg.fit runs without auto (labels drawn once per plate slice: the exact sum,
    # measure-valued), not the registry's first.
    assert training.estimators["shift"].name == "pathwise"
    assert training.estimators["label"].name == "measure_valued"
    assert training.estimators["label"].auto.names[0] == "score_function_loo"
    state = training.init(jax.random.key(1))
    site_state = state.objective_state["label"]
    assert isinstance(site_state, AutoState) and len(site_state.states) == len(training.estimators["label"].auto.names)
    state, info = jax.jit(training.step)(state, DATA)
    assert bool(info.finite)


def test_inference_data_and_figure_carry_the_choices():
    result = fit(mixed_model, mixed_guide, {"label": mg.auto(every=4)}, num_steps=8)
    idata = result.to_inference_data(num_samples=10)
    choice = idata.auto["label_choice"].values
    assert choice.shape == (2,) and set(choice) <= set(result.diagnostics.choices["candidate"])
    assert idata.auto["label_efficiency"].shape == (2, result.diagnostics.choices["candidate"].nunique())
    ledger = result.diagnostics.choices.groupby("step")["run_seconds"].first()
    np.testing.assert_array_equal(idata.auto["run_seconds"].values, ledger.to_numpy())
    assert idata.auto["decision_seconds"].shape == (2,) and (idata.auto["decision_seconds"].values > 0).all()
    figure = mg.plotting.choices_figure(result.diagnostics.choices)
    assert len(figure.axes) == 1


def test_clear_errors():
    plain = fit(gaussian_model, gaussian_guide, None, num_steps=2)  # a state without auto's
    with pytest.raises(ValueError, match=r"resume_from=<FitState>\): the state's objective_state"):
        fit(gaussian_model, gaussian_guide, {"z": mg.auto()}, num_steps=4, resume_from=plain.state)
    with pytest.raises(ValueError, match="batch of restarts"):
        mg.fit(gaussian_model, gaussian_guide, DATA, key=jax.random.split(jax.random.key(0), 2), num_steps=4,
               optimizer=optax.adam(0.05), objective=mg.elbo(2), estimators="auto", progress_bar=False)
    with pytest.raises(ValueError, match="no candidate applies"):
        fit(gaussian_model, gaussian_guide, {"z": mg.auto(candidates={"d": mg.disarm()})}, num_steps=2)
    with pytest.raises(ValueError, match="'auto'"):
        fit(gaussian_model, gaussian_guide, "automatic", num_steps=2)
    with pytest.raises(ValueError, match="num_estimates"):
        mg.auto(num_estimates=1)
    with pytest.raises(ValueError, match="resolved per site"):
        mg.auto().init({})


def test_decision_rule_and_time_budget():
    names = ("a", "b")
    assert decide(0, names, {"a": 1.0, "b": 1.05}, margin=0.1) == 0  # within the margin: stay
    assert decide(0, names, {"a": 1.0, "b": 1.2}, margin=0.1) == 1
    assert decide(1, names, {"a": float("nan"), "b": float("nan")}, margin=0.1) == 1
    # beyond the margin, but not by 2 standard errors of the difference: stay
    assert decide(0, names, {"a": 1.0, "b": 1.2}, margin=0.1, errors={"a": 0.05, "b": 0.05}) == 0
    assert decide(0, names, {"a": 1.0, "b": 1.5}, margin=0.1, errors={"a": 0.05, "b": 0.05}) == 1
    assert decide(0, names, {"a": 1.0, "b": 1.5}, margin=0.1, errors={"a": 0.05, "b": 0.05}, confidence=6.0) == 0
    # the surest is not needed, the best of the sure ones is taken; an unmeasured current yields
    three = ("a", "b", "c")
    errors = {"a": 0.01, "b": 0.01, "c": 0.5}
    assert decide(0, three, {"a": 1.0, "b": 1.4, "c": 1.6}, margin=0.1, errors=errors) == 1
    assert decide(0, three, {"b": 1.4, "c": 1.6}, margin=0.1, errors=errors) == 2
    assert efficiency(0.0, 1e-3) == float("inf") and np.isnan(efficiency(float("nan"), 1.0))
    # the fastest gets every estimate, a 4x slower one a quarter, a 100x slower one the minimum
    assert estimate_counts({"fast": 1e-4, "slow": 4e-4, "slowest": 1e-2}, 12) == {"fast": 12, "slow": 3, "slowest": 2}
    # timed once: out only if full progress (1 a coordinate) per second is `prune` times short
    best = 8.0 / 1e-4  # 8 of 10 coordinates' progress at 0.1 ms
    assert outpaced({"slow": 4e-4, "slowest": 1e-2}, 10, best, prune=10.0) == {"slowest": 10 / 1e-2}
    assert outpaced({"slowest": 1e-2}, 10, best, prune=100.0) == {}  # within a looser prune


@pytest.mark.parametrize("sizes", [(1, 1), (1, 1, 3), (1, 4, 2), (2, 5)])
def test_groups_of_estimates_join_into_one_measurement(sizes):
    # The untimed first estimate, the timing calls and the rest of a candidate's share.
    estimates = np.random.default_rng(0).normal(size=(sum(sizes), 3))
    groups, start = [], 0
    for size in sizes:
        part = estimates[start:start + size]
        variance = part.var(axis=0, ddof=1) if size > 1 else np.full(3, np.nan)  # one estimate: 0/0
        groups.append(Measurement(part.mean(axis=0), variance, 1e-3 * size, size))
        start += size
    joined = functools.reduce(merged, groups)
    assert joined.num_estimates == len(estimates) and joined.seconds == groups[0].seconds
    np.testing.assert_allclose(joined.mean, estimates.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(joined.variance, estimates.var(axis=0, ddof=1), rtol=1e-6)


def test_timing_separates_the_seconds_an_estimate_from_the_call(monkeypatch):
    """Calls of 1 and k estimates that take F + t and F + k·t give t and F, whatever the
    dispatch (a call of none) is; k sized for about 3 ms, past the decision's keys."""
    import mcgrad.selection as selection

    per_estimate, fixed, dispatch = 4e-5, 1.5e-4, 3e-5
    calls = []

    def fake_call(entry, state, keys, first, count, array_inputs):
        calls.append(count)
        return np.zeros(2), np.ones(2), (fixed + count * per_estimate) if count else dispatch

    monkeypatch.setattr(selection, "_timed_call", fake_call)
    monkeypatch.setattr(selection, "time_dispatch", lambda *args: dispatch)
    entry = {}
    groups = time_alone(entry, None, np.zeros((10, 2)), 1, None)
    # k from the one-estimate call (ceil(3 ms / 0.19 ms) + 1), then from the slope (3 ms / 40 µs + 1)
    assert calls == [1, 17, 76] + [1, 76] * 2 and [g.num_estimates for g in groups] == [1]
    assert entry["seconds"] == pytest.approx(per_estimate) and entry["fixed"] == pytest.approx(fixed)
    assert groups[0].seconds == pytest.approx(per_estimate)
    # later calls leave the found fixed cost out, not the dispatch
    assert selection.run_measurement(entry, None, None, 6, 4, None).seconds == pytest.approx(per_estimate)
    # microsecond estimates behind a 40 µs call: resolved at the most estimates a call takes
    calls.clear()
    per_estimate, fixed = 1e-6, 4e-5
    entry = {}
    time_alone(entry, None, np.zeros((10, 2)), 1, None)
    assert calls == [1, 75, selection.MAX_TIMED_ESTIMATES] + [1, selection.MAX_TIMED_ESTIMATES] * 2
    assert entry["seconds"] == pytest.approx(per_estimate) and entry["fixed"] == pytest.approx(fixed)
    # ... and where even those do not outlast a call: a share of the call past the dispatch
    calls.clear()
    per_estimate, fixed = 1e-8, 4e-5
    entry = {}
    time_alone(entry, None, np.zeros((10, 2)), 1, None)
    k = selection.MAX_TIMED_ESTIMATES
    assert "fixed" not in entry and entry["seconds"] == pytest.approx((fixed + k * per_estimate - dispatch) / k)
    # a 2 ms estimate: one call of k = 3 suffices
    calls.clear()
    per_estimate, fixed = 2e-3, 1.5e-4
    entry = {}
    time_alone(entry, None, np.zeros((10, 2)), 1, None)
    assert calls == [1, 3] * 3 and entry["seconds"] == pytest.approx(per_estimate)
    # a long estimate keeps the one call, the fastest of 3 (a slow call can be noise) ...
    calls.clear()
    per_estimate = 1e-2
    entry = {}
    time_alone(entry, None, np.zeros((10, 2)), 1, None)
    assert calls == [1] * 3 and entry["seconds"] == pytest.approx(per_estimate + fixed - dispatch)
    # ... one call of it where it is long beyond doubt (30 ms and more)
    calls.clear()
    per_estimate = 4e-2
    time_alone({}, None, np.zeros((10, 2)), 1, None)
    assert calls == [1]
    # a short estimate slow once (a first fit's noise) is timed as a short one
    per_estimate, fixed = 4e-5, 1.5e-4
    slow_once = iter([5e-3])

    def noisy_call(entry, state, keys, first, count, array_inputs):
        calls.append(count)
        return np.zeros(2), np.ones(2), next(slow_once, fixed + count * per_estimate)

    monkeypatch.setattr(selection, "_timed_call", noisy_call)
    calls.clear()
    entry = {}
    time_alone(entry, None, np.zeros((10, 2)), 1, None)
    assert calls == [1, 1, 1, 17, 76] + [1, 76] * 2 and entry["seconds"] == pytest.approx(per_estimate)


def test_the_parameters_that_feed_a_site():
    training = mg.trainer(mixed_model, mixed_guide, DATA, key=jax.random.key(0), objective=mg.elbo(2),
                          optimizer=optax.adam(0.05))
    state = training.init(jax.random.key(1))
    constrained = lambda p: training.params(state._replace(params=p))  # noqa: E731
    mask = upstream_mask(mixed_guide, (DATA,), {}, jax.random.key(0), state, constrained, "label")
    # flattened in jax.tree.leaves order: label_logits (6), shift_loc, shift_scale
    assert mask.tolist() == [True] * 6 + [False, False]
    mask = upstream_mask(mixed_guide, (DATA,), {}, jax.random.key(0), state, constrained, "shift")
    assert mask.tolist() == [False] * 6 + [True, True]


def test_the_recorded_variance_is_the_variance_of_the_step_gradient():
    """The measurement's variance (10 estimates) against the empirical variance over 200
    independent estimates of the same trainer at the same state, within sampling error.
    By default a decision spends at most ``budget`` of the run's steps per decision: for a
    repeated 1-step fit that is the floor of 2 estimates; ``budget=inf`` takes all 10."""
    candidates = {"sf": mg.score_function()}
    # (The first fit of a program also takes the estimates that time it, outside the budget;
    # the second starts from that timing.)
    for _ in range(2):
        budgeted = fit(gaussian_model, gaussian_guide, {"z": mg.auto(candidates=candidates, num_estimates=10)},
                       num_steps=1)
    assert budgeted.diagnostics.choices.iloc[0]["num_estimates"] == 2
    estimators = {"z": mg.auto(candidates=candidates, num_estimates=10, budget=math.inf)}
    result = fit(gaussian_model, gaussian_guide, estimators, num_steps=1)
    record = result.diagnostics.choices.iloc[0]
    assert record["num_estimates"] == 10
    training = mg.trainer(gaussian_model, gaussian_guide, DATA, key=jax.random.key(0), objective=mg.elbo(2),
                          optimizer=optax.adam(0.05), estimators={"z": mg.score_function()})
    state = training.init(jax.random.key(1))
    grads = jax.vmap(lambda k: training.estimate(state, k, DATA)[1])(jax.random.split(jax.random.key(7), 200))
    flat = np.stack([np.asarray(g) for g in jax.tree.leaves(grads)], axis=1)  # [200, 2 coordinates]
    variance, mean = flat.var(axis=0, ddof=1), flat.mean(axis=0)
    # a sum of 2 variances from 10 draws: relative standard error about sqrt(2/9) each
    assert 0.2 * variance.sum() < record["raw_variance"] < 3.0 * variance.sum()
    # relative to the second moment (one candidate: its own), each coordinate's term is below 1
    relative = np.sum(variance / (mean**2 + variance))
    assert 0.2 * relative < record["variance"] < 2.0


@pytest.mark.parametrize("criterion", ["progress", "variance"])
@pytest.mark.parametrize("num_estimates", [4, 10])
def test_the_efficiency_error_is_the_spread_of_the_efficiency_over_measurements(criterion, num_estimates):
    """Gaussian estimates of 6 coordinates (signal and noise of each size), measured again
    and again: the spread of the efficiency over 4000 measurements of ``num_estimates``
    against :func:`standard_errors`' prediction (a delta method: within 25%)."""
    rng = np.random.default_rng(0)
    mean = np.array([1.0, -0.5, 0.2, 2.0, 0.0, 0.7])
    sd = np.array([0.5, 1.0, 2.0, 0.3, 1.0, 0.7])
    mask = np.ones(6, bool)
    reference = Measurement(mean, sd**2, 1e-3, 100_000)  # pins the pooled signal and scale
    efficiencies, predicted = [], []
    for _ in range(4000):
        draws = mean + sd * rng.normal(size=(num_estimates, 6))
        measured = Measurement(draws.mean(axis=0), draws.var(axis=0, ddof=1), 1e-3, num_estimates)
        both = {"reference": reference, "measured": measured}
        if criterion == "progress":
            efficiencies.append(progress(both, mask)["measured"])
        else:
            efficiencies.append(1.0 / relative_variances(both, mask)["measured"])
        predicted.append(standard_errors(both, mask, criterion, timing_error=0.0)["measured"])
    efficiencies = np.array(efficiencies)
    spread = efficiencies.std() / efficiencies.mean()
    assert 0.75 * spread < np.median(predicted) < 1.25 * spread, (spread, np.median(predicted))


def test_a_candidate_that_refuses_the_site_is_not_traced_again():
    """Enumeration over 2^9 configurations (more than its 256) refuses once traced; the
    refusal is kept with its measurement program, so a second fit does not trace it again."""
    import mcgrad.selection as selection

    def model(x):
        bits = numpyro.sample("bits", dist.Bernoulli(0.5).expand([9]).to_event(1))
        numpyro.sample("x", dist.Normal(jnp.sum(bits), 1.0), obs=x)

    def guide(x):
        logits = numpyro.param("logits", jnp.zeros(9))
        numpyro.sample("bits", dist.Bernoulli(logits=logits).to_event(1))

    estimators = {"bits": mg.auto(candidates={"sf": mg.score_function(), "enumerate": mg.enumerate()})}
    first = fit(model, guide, estimators, num_steps=4)
    choices = first.diagnostics.choices
    assert not choices.loc[choices["candidate"] == "enumerate", "measured"].any()
    assert choices.loc[choices["candidate"] == "sf", "measured"].all()
    refused = [entry for entry in selection.MEASURERS.entries.values() if entry.get("refused")]
    assert len(refused) == 1 and "enumerat" in refused[0]["refused"].lower()

    class NotAgain:
        def lower(self, *args, **kwargs):
            raise AssertionError("traced again")

    refused[0]["measure"] = NotAgain()
    second = fit(model, guide, estimators, num_steps=4).diagnostics.choices
    assert not second.loc[second["candidate"] == "enumerate", "measured"].any()


def test_a_decision_spends_what_the_run_leaves_unspent():
    """A short run's first decision may spend the whole run's budget (the next waits until
    the run has paid for it); a later one at least a segment's share."""
    from mcgrad.selection import estimates_budget

    first = estimates_budget(0.05, 400, 1e-4, (0.0, 0.0, 2000), calls=0.0, num_sites=2)
    assert first == pytest.approx(0.05 * 2000 * 1e-4 / 2)  # 5 ms a site, not a fifth of it
    # the calls' fixed seconds come out of it, for every site
    assert estimates_budget(0.05, 400, 1e-4, (0.0, 0.0, 2000), calls=1e-3, num_sites=2) == pytest.approx(first - 1e-3)
    # what earlier decisions took comes out of it too, down to a segment's share
    spent = estimates_budget(0.05, 400, 1e-4, (0.1, 0.01, 1000), calls=0.0, num_sites=1)
    assert spent == pytest.approx(0.05 * 400 * 1e-4)
    # the sites in turn: what the first site's estimates left is the second's
    assert estimates_budget(0.05, 400, 1e-4, (0.0, 0.0, 2000), calls=0.0, num_sites=1,
                            spent=1e-3) == pytest.approx(2 * first - 1e-3)


def test_candidates_are_timed_in_turn(monkeypatch):
    """Fresh candidates' timing calls alternate, so a passing slowdown falls on all alike;
    each gets what it would alone."""
    import mcgrad.selection as selection

    costs = {"cheap": (1.5e-4, 4e-5), "long": (1.5e-4, 2e-3)}  # (a call's fixed cost, an estimate)
    calls = []

    def fake_call(entry, state, keys, first, count, array_inputs):
        calls.append((entry["name"], count))
        fixed, per_estimate = costs[entry["name"]]
        return np.zeros(2), np.ones(2), fixed + count * per_estimate

    monkeypatch.setattr(selection, "_timed_call", fake_call)
    monkeypatch.setattr(selection, "time_dispatch", lambda *args: 3e-5)
    keys = np.zeros((10, 2))
    alone = {name: time_alone({"name": name}, None, keys, 1, None) for name in costs}
    calls.clear()
    entries = {name: {"name": name} for name in costs}
    together, seconds = selection._interleaved(
        {name: selection._timing(entry, None, keys, 1, None) for name, entry in entries.items()})
    assert [name for name, _ in calls[:4]] == ["cheap", "long", "cheap", "long"]
    for name in costs:
        assert [g.num_estimates for g in together[name]] == [g.num_estimates for g in alone[name]]
        assert entries[name]["seconds"] == pytest.approx(alone[name][0].seconds) and seconds[name] > 0


def test_programs_without_xla_counts_keep_their_own_timings():
    # a backend without a cost analysis: no count, and no program shares its timing
    assert program_cost({"compiled": object()}) is None
    counted = (1e6, 0.0, 1e6)
    alone = counted_seconds({"a": 1e-4, "b": 2e-4}, {"a": None, "b": counted})
    assert alone == {"a": 1e-4, "b": 2e-4}
    # programs of one work share one level: their timings' median (a mean of two)
    priced = counted_seconds({"a": 1e-4, "b": 2e-4, "c": 3e-4}, {"a": None, "b": counted, "c": counted})
    assert priced["a"] == 1e-4 and priced["b"] == pytest.approx(priced["c"])
    assert priced["b"] == pytest.approx(math.sqrt(2e-4 * 3e-4))  # geometric: the medians are of logs


def test_counted_seconds_follow_work_and_resist_a_wild_timing():
    """Seconds ∝ work^0.8 exactly: returned as timed. One of five timed 3× low (a fresh
    program's timing after a compile): the others stay within 10% and it comes back within
    25% of its true seconds."""
    work = {"a": 1e6, "b": 2e6, "c": 4e6, "d": 8e6, "e": 3e6}
    truth = {c: 1e-4 * (w / 1e6) ** 0.8 for c, w in work.items()}
    costs = {c: (w, 0.0, 0.0) for c, w in work.items()}
    assert counted_seconds(truth, costs) == pytest.approx(truth)
    wild = dict(truth, e=truth["e"] / 3)
    priced = counted_seconds(wild, costs)
    assert all(abs(priced[c] / truth[c] - 1) < 0.10 for c in "abcd"), priced
    assert abs(priced["e"] / truth["e"] - 1) < 0.25, priced
    # the exponent stays within its bounds: a 100x spread of seconds over 2x the work is noise
    steep = counted_seconds({"a": 1e-5, "b": 1e-3}, {"a": (1e6, 0, 0), "b": (2e6, 0, 0)})
    assert steep["b"] / steep["a"] == pytest.approx(2.0 ** max(mg.selection.WORK_EXPONENT))


@pytest.mark.parametrize("num_estimates", [3, 10])
def test_progress_is_not_ranked_up_by_few_estimates(num_estimates):
    """Gaussian estimates of coordinates where noise rules (variance 10-100× the squared
    gradient progress is ranked at, :data:`~mcgrad.selection.LATE_GRADIENT` of it): over 4000 measurements of ``num_estimates`` the mean progress is within 10%
    (3 estimates: 8%) and 3% (10: 0.6%) of the progress at the true variance; the plug-in
    alone is 47% high from 3 estimates and 9% from 10."""
    rng = np.random.default_rng(1)
    mean = np.array([3.0, -2.0, 1.0, 5.0, -3.0, 2.0])
    late = LATE_GRADIENT * np.abs(mean)  # the gradient progress is ranked at
    sd = np.array([1.0, 2.0, 1.0, 2.0, 3.0, 2.0])
    mask = np.ones(6, bool)
    reference = Measurement(mean, sd**2, 1e-3, 1_000_000)  # pins the pooled signal
    exact = float(np.sum(late / np.sqrt(late**2 + sd**2)))
    corrected, plain = [], []
    for _ in range(4000):
        draws = mean + sd * rng.normal(size=(num_estimates, 6))
        measured = Measurement(draws.mean(axis=0), draws.var(axis=0, ddof=1), 1e-3, num_estimates)
        corrected.append(progress({"reference": reference, "measured": measured}, mask)["measured"])
        plain.append(float(np.sum(late / np.sqrt(late**2 + measured.variance))))
    tolerance = 0.10 if num_estimates == 3 else 0.03
    assert abs(np.mean(corrected) / exact - 1.0) < tolerance, (np.mean(corrected), exact)
    if num_estimates == 3:
        assert np.mean(plain) / exact > 1.3   # what the correction removes


def measured_with_faked_calls(monkeypatch, seconds, noise, mask, last=None, **settings):
    """:func:`mcgrad.selection._measure_site` on one site whose candidates' programs were
    timed by an earlier fit at ``seconds`` an estimate, their calls faked: every estimate a
    gradient of 1 a coordinate, with variance ``noise[name]``. Returns the rows and the
    calls, ``(name, estimates)`` each."""
    import mcgrad.selection as selection
    from mcgrad.estimators.choice import AutoSettings, AutoSite

    entries = {name: {"name": name, "compiled": object(), "seconds": t, "fixed": 0.0, "ran": True}
               for name, t in seconds.items()}
    names = tuple(seconds)
    calls = []

    def fake_call(entry, state, keys, first, count, array_inputs):
        calls.append((entry["name"], count))
        return np.ones(mask.size), np.full(mask.size, noise[entry["name"]]), count * entry["seconds"]

    monkeypatch.setattr(selection, "_timed_call", fake_call)
    settings = AutoSettings(None, None, **dict(dict(num_estimates=10, margin=0.1, prune=10.0, budget=1.0), **settings))
    sites = {"z": AutoSite(settings, names, (None,) * len(names), 0)}
    rows = selection._measure_site(None, sites, {"z": 0}, "z", None, np.zeros((10, 2)), None,
                                   lambda choices: entries[names[choices["z"]]], mask, last or {},
                                   100.0, None, (0.0, 0.0, 1000))
    return rows, calls


def test_waiting_candidates_are_ruled_out_by_the_best_so_far(monkeypatch):
    """Three candidates timed by an earlier fit, all at the 2-estimate floor (a tight
    budget). The cheapest is measured first (poor progress), then the next cheapest (nearly
    full progress); its efficiency rules the dearest out on its ceiling, with no estimate.
    Measured on the fastest alone, the dearest's ceiling had stood (a 21-ms measurement of
    measure-valued in the BLR's repeated fits)."""
    seconds = {"fast": 1e-4, "good": 2e-4, "dear": 1e-2}
    noise = {"fast": 1.0, "good": 1e-6, "dear": 1e-6}  # per coordinate, against a gradient of 1
    rows, calls = measured_with_faked_calls(monkeypatch, seconds, noise, np.ones(10, bool), budget=1e-9)
    assert calls == [("fast", 2), ("good", 2)]
    assert rows["dear"]["num_estimates"] == 0 and math.isnan(rows["dear"]["progress"])
    assert rows["dear"]["efficiency"] * 10.0 < rows["good"]["efficiency"]
    assert rows["fast"]["efficiency"] < rows["dear"]["efficiency"] * 10.0  # the fastest alone: not out


def test_a_segment_runs_as_one_call(monkeypatch):
    # On the default schedule a decision the run cannot afford is skipped and the segments
    # around it join: the chunk is compiled for the rest of the run, so a joined segment is
    # one call (it was cut at the schedule's longest gap: four calls for these 40 steps).
    import sys

    fit_module = sys.modules["mcgrad.fit"]
    calls = []
    replayed = fit_module._replayed
    monkeypatch.setattr(fit_module, "_replayed", lambda run, state, n, limit: calls.append(n) or replayed(run, state, n, limit))
    result = fit(mixed_model, mixed_guide, {"label": mg.auto(budget=1e-9)}, num_steps=40)
    assert set(result.diagnostics.choices["step"]) == {0} and calls == [40]


@pytest.mark.parametrize("site_coordinates", [2, 30])
def test_a_site_whose_progress_is_within_the_timing_error_takes_the_floor(monkeypatch, site_coordinates):
    """A site of 2 coordinates among 60, the others' progress about 58 a step: its own
    progress moves an efficiency by under 5% (the seconds' error), so after the current
    choice's two estimates every candidate takes 2. A site of 30 is not probed and takes
    what the budget buys (10 of the fastest)."""
    import mcgrad.selection as selection

    seconds = {"a": 1e-4, "b": 1.25e-4, "c": 1.5e-4}
    rows, calls = measured_with_faked_calls(monkeypatch, seconds, dict.fromkeys(seconds, 1e-4),
                                            np.arange(60) < site_coordinates)
    if site_coordinates == 2:
        assert calls == [("a", 2), ("b", 2), ("c", 2)]
        assert rows["a"]["shared_progress"] * selection.TIMING_ERROR >= 2
    else:
        assert calls == [("a", 10), ("b", 8), ("c", 7)]
    assert all(rows[c]["num_estimates"] == n for c, n in calls)


def test_a_pruned_candidate_stays_pruned_as_efficiencies_fall(monkeypatch):
    """Pruned on its standing when last measured: "slow" made a 40th of the best's progress
    a second then. Efficiencies fall as a run's gradients shrink, so its old number is
    within `prune` of the current best's (5 × 10 > 30); it is still not measured."""
    last = {"fast": {"efficiency": 30.0, "best_then": 30.0, "timed_seconds": 1e-4, "measured": True},
            "slow": {"efficiency": 5.0, "best_then": 200.0, "timed_seconds": 1e-2, "measured": False}}
    rows, calls = measured_with_faked_calls(monkeypatch, {"fast": 1e-4, "slow": 1e-4}, {"fast": 1.0, "slow": 1.0},
                                            np.ones(10, bool), last)
    assert {name for name, _ in calls} == {"fast"} and not rows["slow"]["measured"]
    assert rows["slow"]["efficiency"] == 5.0
    assert rows["fast"]["best_then"] == rows["fast"]["efficiency"] and rows["slow"]["best_then"] == 200.0
