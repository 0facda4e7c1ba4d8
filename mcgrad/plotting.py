"""Matplotlib figures of diagnostics tables.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI
backend needed): save them with ``figure.savefig(path)``; notebooks display them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def comparison_figure(table: pd.DataFrame) -> Figure:
    """Three bar panels from a :func:`mcgrad.compare` table: variance per parameter leaf
    (log scale), seconds per estimate, and efficiency ``1/(variance·seconds)`` (log).

    Example:
        >>> import pandas as pd, mcgrad as mg
        >>> table = pd.DataFrame({"variance[loc]": [4.0, 30.0], "seconds": [1e-4, 1e-4],
        ...                       "efficiency": [2.5e3, 3e2]}, index=["pathwise", "score"])
        >>> len(mg.plotting.comparison_figure(table).axes)
        3
    """
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    variance_axes, time_axes, efficiency_axes = figure.subplots(1, 3)
    names = [str(name) for name in table.index]
    positions = np.arange(len(names))

    variance_columns = [c for c in table.columns if c.startswith("variance[")]
    width = 0.8 / max(len(variance_columns), 1)
    for index, column in enumerate(variance_columns):
        offset = (index - (len(variance_columns) - 1) / 2) * width
        variance_axes.bar(positions + offset, table[column].to_numpy(), width, label=column[len("variance[") : -1])
    variance_axes.set_yscale("log")
    variance_axes.set_title("variance of one estimate")
    if variance_columns:
        variance_axes.legend(title="parameter", fontsize="small")

    time_axes.bar(positions, table["seconds"].to_numpy() * 1e6, color="tab:gray")
    time_axes.set_title("time per estimate (µs)")

    efficiency_axes.bar(positions, table["efficiency"].to_numpy(), color="tab:green")
    efficiency_axes.set_yscale("log")
    efficiency_axes.set_title("efficiency 1/(variance·seconds)")

    for axes in (variance_axes, time_axes, efficiency_axes):
        axes.set_xticks(positions, names, rotation=20, ha="right")
    return figure


def sweep_figure(
    table: pd.DataFrame,
    *,
    cost_labels: dict[str, str] | None = None,
    parameter_labels: dict[str, str] | None = None,
) -> Figure:
    """Variance against ``k`` from a :func:`mcgrad.variance_sweep` table: one panel per
    (cost, parameter), one line per estimator, log-scale variance.

    The ``k`` axis is logarithmic for a grid that is positive and spans more than a factor
    of 20. An ``exact_variance`` column, where present and finite, is drawn dashed.
    ``cost_labels`` and ``parameter_labels`` map names to what the titles show.

    Example:
        >>> import pandas as pd, mcgrad as mg
        >>> table = pd.DataFrame({"cost": ["q"] * 4, "k": [0.0, 1.0] * 2,
        ...                       "estimator": ["a", "a", "b", "b"], "parameter": ["loc"] * 4,
        ...                       "variance": [1.0, 2.0, 3.0, 4.0]})
        >>> len(mg.plotting.sweep_figure(table).axes)
        1
    """
    cost_labels = cost_labels or {}
    parameter_labels = parameter_labels or {}
    costs = list(dict.fromkeys(table["cost"]))
    parameters = list(dict.fromkeys(table["parameter"]))
    estimators = list(dict.fromkeys(table["estimator"]))
    colors = {name: f"C{index}" for index, name in enumerate(estimators)}
    figure = Figure(figsize=(4.2 * len(parameters), 3.2 * len(costs)), layout="constrained")
    grid = figure.subplots(len(costs), len(parameters), squeeze=False)
    for row, cost in enumerate(costs):
        for column, parameter in enumerate(parameters):
            axes = grid[row, column]
            panel = table[(table["cost"] == cost) & (table["parameter"] == parameter)]
            for estimator in estimators:
                lines = panel[panel["estimator"] == estimator].sort_values("k")
                axes.plot(lines["k"], lines["variance"], color=colors[estimator], label=estimator)
                if "exact_variance" in lines and np.isfinite(lines["exact_variance"]).any():
                    axes.plot(lines["k"], lines["exact_variance"], color=colors[estimator], linestyle="--", linewidth=0.8)
            k = panel["k"].to_numpy()
            if len(k) and k.min() > 0 and k.max() / k.min() > 20:
                axes.set_xscale("log")
            axes.set_yscale("log")
            axes.set_title(
                f"{cost_labels.get(cost, cost)}, ∂/∂{parameter_labels.get(parameter, parameter)}", fontsize="medium"
            )
            axes.set_xlabel("k")
            if column == 0:
                axes.set_ylabel("per-sample variance")
    grid[0, 0].legend(fontsize="small")
    return figure


def choices_figure(choices: pd.DataFrame) -> Figure:
    """``mg.auto()``'s decisions over training, one panel per auto site: each candidate's
    measured efficiency (progress or ``1/variance`` per second) at every decision (log scale; hollow where
    a pruned candidate kept its last numbers) and the chosen one ringed.

    ``choices`` is ``FitResult.diagnostics.choices``.

    Example:
        >>> import pandas as pd, mcgrad as mg
        >>> choices = pd.DataFrame({"step": [0, 0, 50, 50], "site": ["z"] * 4,
        ...                         "candidate": ["pathwise", "score", "pathwise", "score"],
        ...                         "efficiency": [10.0, 1.0, 8.0, 9.0], "measured": [True] * 4,
        ...                         "chosen": [True, False, False, True]})
        >>> len(mg.plotting.choices_figure(choices).axes)
        1
    """
    sites = list(dict.fromkeys(choices["site"]))
    figure = Figure(figsize=(7, 3.2 * len(sites)), layout="constrained")
    axes_list = np.atleast_1d(figure.subplots(len(sites), 1, squeeze=False)[:, 0])
    for axes, site in zip(axes_list, sites, strict=True):
        panel = choices[choices["site"] == site]
        for index, (candidate, rows) in enumerate(panel.groupby("candidate", sort=False)):
            color = f"C{index}"
            axes.plot(rows["step"], rows["efficiency"], "-", color=color, alpha=0.6, label=candidate)
            measured = rows[rows["measured"]]
            axes.plot(measured["step"], measured["efficiency"], "o", color=color)
            kept = rows[~rows["measured"]]
            axes.plot(kept["step"], kept["efficiency"], "o", color=color, fillstyle="none")
        chosen = panel[panel["chosen"]]
        axes.plot(chosen["step"], chosen["efficiency"], "o", markersize=13, fillstyle="none", color="black",
                  label="chosen")
        axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("efficiency (what auto ranks)")
        axes.set_title(f"site '{site}': mg.auto() decisions")
        axes.legend(fontsize="small", ncol=2)
    return figure
