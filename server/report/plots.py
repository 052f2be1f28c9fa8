"""The report's figures (PNG, matplotlib's Agg backend): one run's rounds and gateway classes,
one sweep's trade-offs per task. Each ``plot_*`` writes ``path`` and returns True, or returns
False and writes nothing when there is nothing to plot.

matplotlib is imported by :func:`pyplot` on the first plot, not with the module: the backend
switch to Agg is then this module's business only when it draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from iiotfl.server.report.runs import metric_columns
from iiotfl.server.report.text import direction, finite, metric_label

MARKERS = "osD^v<>ph*"  # one per strategy of a sweep plot
DP_LINE_STYLES = {"sample": "-", "client": ":"}  # sweep plot: the line joining one DP mechanism's runs


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return True


def strategy_colours(strategies: list[str]) -> dict[str, Any]:
    """One tab10 colour per strategy, in the order given (the same in every plot of a sweep)."""
    pyplot()
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {s: palette(i % 10) for i, s in enumerate(strategies)}


def plot_classes(classes: dict[str, dict[str, Any]], path: Path) -> bool:
    """Stacked compute / transfer / waiting per gateway class, the link-bound clock beside."""
    if not classes:
        return False
    plt = pyplot()
    names = list(classes)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bottom = [0.0] * len(names)
    for key, colour in (("compute_s", "tab:blue"), ("transfer_s", "tab:orange"), ("wait_s", "tab:grey")):
        vals = [classes[n][key] or 0.0 for n in names]
        axes[0].bar(names, vals, bottom=bottom, label=key[:-2], color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[0].scatter(names, [classes[n]["sim_s"] or 0.0 for n in names], marker="_", s=600, color="k",
                    label="simulated clock", zorder=3)
    axes[0].set_ylabel("seconds per gateway and round")
    axes[0].legend(fontsize=7)
    width = 0.2
    for j, key in enumerate(("bytes_up", "bytes_down", "wire_up", "wire_down")):
        axes[1].bar([i + (j - 1.5) * width for i in range(len(names))],
                    [(classes[n][key] or 0.0) / 1000 for n in names], width, label=key)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylabel("kB per gateway and round")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def plot_rounds(rounds: list[dict[str, Any]], path: Path, metric: str | None = None,
                higher_is_better: bool | None = None) -> bool:
    """PNG of the server-side primary metric and mean client training loss per round."""
    scored = [r for r in rounds if r["server"]]
    if not scored:
        return False
    plt = pyplot()
    metric = metric or next(iter(metric_columns(scored, None)), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["round"] for r in scored]
    # RMSE at the last cycle is in the same unit as RMSE: one axis for both
    for key in [metric] + (["rmse_last"] if metric == "rmse" else []):
        pts = [(n, r["server"][key]) for n, r in zip(x, scored) if finite(r["server"].get(key))]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=metric_label(key))
    axes[0].set_xlabel("round")
    way = f" ({direction(higher_is_better)})" if higher_is_better is not None else ""
    axes[0].set_ylabel("RUL error [cycles]" if metric == "rmse" else f"{metric_label(metric)}{way}")
    axes[0].set_title("Global model on held-out data")
    axes[0].legend()
    _plot_train_loss(axes[1], rounds, metric)
    return _save(fig, path)


def _plot_train_loss(ax: Any, rounds: list[dict[str, Any]], metric: str | None) -> None:
    """Each gateway's local training loss per round (log scale when every loss is positive)."""
    trained = [r for r in rounds if r["clients"]]
    positive = True
    for part in sorted({c.get("partition") for r in trained for c in r["clients"]}, key=str):
        pts = [(r["round"], c["train_loss"]) for r in trained for c in r["clients"]
               if c.get("partition") == part and finite(c.get("train_loss"))]
        if not pts:
            continue
        positive = positive and all(v > 0 for _, v in pts)
        ax.plot(*zip(*pts), marker=".", label=f"gateway {int(part)}" if part is not None else "gateway")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss (MSE of RUL/cap)" if metric == "rmse" else "local training loss")
    if positive:
        ax.set_yscale("log")
    ax.set_title("Local training per gateway")
    if trained:
        ax.legend(fontsize=7)


def plot_sweep(rows: list[dict[str, Any]], task: str, path: Path, colours: dict[str, Any]) -> bool:
    """Trade-offs of one task's completed runs: primary metric against epsilon (no DP at the right
    edge and as dashed reference lines), bytes up per gateway and round, and wall time. One series
    (colour, marker) per strategy; points labelled with what else differs between the runs."""
    done = [r for r in rows if r["task"] == task and r["status"] == "completed" and finite(r.get("final_metric"))]
    if not done:
        return False
    plt = pyplot()
    metric = done[0]["metric"]
    label = _point_label(done)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    values = [r["final_metric"] for r in done]
    log_y = min(values) > 0 and max(values) / min(values) > 100
    _plot_vs_epsilon(axes[0], done, task, colours, label)
    for ax, key, scale, xlabel, title in (
        (axes[1], "bytes_up_per_client_round", 1e-3, "kB up per gateway per round (model payload)", "vs communication"),
        (axes[2], "wall_s", 1.0, "wall time of the run [s]", "vs wall time"),
    ):
        _plot_vs(ax, done, key, scale, colours, label)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{task}: {metric_label(metric)} {title}")
    for ax in axes:
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="strategy", title_fontsize=7)
    return _save(fig, path)


def _point_label(done: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str] | None:
    """Labels naming what differs between a task's points besides the strategy (None: too many
    points to label)."""
    if len(done) > 16:
        return None
    label_keys = [g for g in ("privacy", "link", "codec") if len({r[g] for r in done}) > 1]  # the colour: strategy

    def label(r: dict[str, Any]) -> str:
        parts = [f"{g}={r[g]}" for g in label_keys] + ([r["overrides"]] if r["overrides"] else [])
        return ", ".join(p for p in parts if p)

    return label


def _annotate(ax: Any, label: Callable[[dict[str, Any]], str] | None, r: dict[str, Any], x: float) -> None:
    if label is not None:
        ax.annotate(label(r), (x, r["final_metric"]), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _plot_vs(ax: Any, done: list[dict[str, Any]], key: str, scale: float, colours: dict[str, Any],
             label: Callable[[dict[str, Any]], str] | None) -> None:
    """The metric against the figure ``key`` (times ``scale``), one scatter per strategy."""
    xs = [r[key] for r in done if finite(r.get(key)) and r[key] > 0]
    for j, strat in enumerate(sorted({r["strategy"] for r in done})):
        pts = [r for r in done if r["strategy"] == strat and finite(r.get(key))]
        if not pts:
            continue
        ax.scatter([r[key] * scale for r in pts], [r["final_metric"] for r in pts],
                   marker=MARKERS[j % len(MARKERS)], color=colours.get(strat), label=strat, zorder=3)
        for r in pts:
            _annotate(ax, label, r, r[key] * scale)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")


def _plot_vs_epsilon(ax: Any, done: list[dict[str, Any]], task: str, colours: dict[str, Any],
                     label: Callable[[dict[str, Any]], str] | None) -> None:
    """The metric against epsilon: one line per strategy and DP mechanism, the runs without DP
    at the right edge (∞) and the best of them as a dashed line per strategy."""
    metric, higher = done[0]["metric"], done[0].get("higher_is_better")
    finite_eps = [r["epsilon"] for r in done if r["dp"] != "none" and finite(r.get("epsilon"))]
    log_x = bool(finite_eps) and min(finite_eps) > 0 and max(finite_eps) / min(finite_eps) > 20
    x_inf = max(finite_eps) * (3.0 if log_x else 1.25) if finite_eps and max(finite_eps) > 0 else 1.0
    for j, strat in enumerate(sorted({r["strategy"] for r in done})):
        c, m = colours.get(strat), MARKERS[j % len(MARKERS)]
        mine = [r for r in done if r["strategy"] == strat]
        dp = [r for r in mine if r["dp"] != "none" and finite(r.get("epsilon"))]
        plain = [r for r in mine if r["dp"] == "none"]
        labelled = False
        for mech in sorted({r["dp"] for r in dp}):  # one line per DP mechanism, along epsilon
            pts = sorted((r for r in dp if r["dp"] == mech), key=lambda r: r["epsilon"])
            ax.plot([r["epsilon"] for r in pts], [r["final_metric"] for r in pts], marker=m, color=c,
                    linestyle=DP_LINE_STYLES.get(mech, "-"), label=None if labelled else strat)
            labelled = True
        if plain:
            ax.scatter([x_inf] * len(plain), [r["final_metric"] for r in plain], marker=m, color=c,
                       label=None if labelled else strat, zorder=3)
            ref = (max if higher else min)(r["final_metric"] for r in plain)
            ax.axhline(ref, color=c, linestyle="--", linewidth=0.9, alpha=0.7)
        for r in dp + plain:
            _annotate(ax, label, r, r["epsilon"] if r["dp"] != "none" else x_inf)
    _epsilon_axis(ax, finite_eps, x_inf, log_x)
    ax.set_xlabel("epsilon spent (privacy; dashed: best run without DP)")
    ax.set_ylabel(f"{metric_label(metric)} ({direction(higher)})")
    ax.set_title(f"{task}: {metric_label(metric)} vs privacy")


def _epsilon_axis(ax: Any, finite_eps: list[float], x_inf: float, log_x: bool) -> None:
    """Epsilon ticks up to the largest finite one, then ∞ (no DP) at ``x_inf``."""
    if finite_eps:
        if log_x:
            ax.set_xscale("log")
            lo, hi = min(finite_eps) / 2, x_inf * 1.6
        else:
            lo, hi = min(0.0, min(finite_eps)), x_inf * 1.1
        ax.set_xlim(lo, hi)
        ticks = [t for t in ax.get_xticks() if lo <= t <= (x_inf / 1.7 if log_x else x_inf - 0.12 * (x_inf - lo))]
    else:  # no DP anywhere: one column of points at "no DP"
        ax.set_xlim(0.5, 1.5)
        ticks = []
    ax.minorticks_off()
    ax.set_xticks(list(ticks) + [x_inf], [f"{t:g}" for t in ticks] + ["∞\n(no DP)"])
