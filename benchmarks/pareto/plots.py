"""The Pareto figure: per dataset, accuracy against BOPs for every method, and the comparison at the budget."""

from __future__ import annotations

from benchmarks.pareto.results import CEILING, DRAWN, MAXIMAL, family

STYLE = {"uniform": ("tab:blue", "s"), "fliqs int": ("tab:red", "o"), "fliqs fp": ("tab:orange", "o"),
         "fliqs int+fp": ("tab:purple", "o"), "fliqs-loss int": ("tab:pink", "D"),
         "fliqs-h256 int": ("tab:olive", "D"),
         "fliqs-short int": ("black", "*"), "fliqs-budget int": ("tab:cyan", "P"),
         "fliqs-loss-budget int": ("darkblue", "P"), "fliqs-loss-budget retrained": ("darkblue", "1"),
         "fliqs-loss-budget-beta4 int": ("magenta", "P"), "fliqs-short-beta4 int": ("magenta", "*"),
         "fliqs-loss-budget-exact int": ("teal", "X"), "fliqs-loss-exact int": ("teal", "D"),
         "fliqs-loss-budget-exact-high int": ("darkorange", "X"),
         "fliqs-loss-budget-exact-high50 int": ("darkorange", "P"),
         CEILING: ("darkred", "_"), MAXIMAL: ("salmon", "d"),
         "random": ("tab:gray", "x"), f"random {DRAWN}": ("dimgray", "+"),
         "sensitivity": ("tab:green", "^"), "progressive": ("goldenrod", "<"), "supernet": ("darkgreen", "h"),
         "hgq2": ("tab:brown", "v")}


def _style(name: str) -> tuple[str, str]:
    # The uniform reference after the draws, whichever format the comparison budget names.
    return STYLE.get(name) or (("tab:blue", "+") if name.endswith(DRAWN) else ("black", "."))


def _panel(axis, summaries, comparison_bops, title):
    from matplotlib import ticker

    seen = set()
    for group, summary in summaries.items():
        name = family(group)
        color, marker = _style(name)
        axis.errorbar(summary["mean_bops"] / 1e6, summary["mean_accuracy"] * 100,
                      yerr=summary["std_accuracy"] * 100, color=color, marker=marker, capsize=3,
                      linestyle="none", label=None if name in seen else name)
        seen.add(name)
        if group.startswith("uniform"):
            axis.annotate(group.split()[1], (summary["mean_bops"] / 1e6, summary["mean_accuracy"] * 100),
                          textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    axis.axvline(comparison_bops / 1e6, color="gray", linewidth=0.6, linestyle=":")
    axis.set_xscale("log")
    # Plain numbers, and of the minor ticks only 2x and 5x: matplotlib's own labels of a log axis
    # that spans one to two decades overlap.
    axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(ticker.FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
    axis.set_xlabel("MBOPs (log)")
    axis.set_ylabel("test accuracy (%), mean ± std of seeds")
    lowest = min(s["mean_accuracy"] - s["std_accuracy"] for s in summaries.values())
    axis.set_ylim(bottom=max(lowest * 100 - 1, 0))
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="lower right")


def _comparison_panel(axis, verdict, title):
    """One row per method at the budget (its BOPs range in the label): every seed, the mean ± std, and
    the 75% line of the target."""
    summaries = verdict["summaries"]
    low = summaries[verdict["uniform_reference"]]["mean_accuracy"] * 100
    high = summaries["uniform int8"]["mean_accuracy"] * 100
    for row, (group, summary) in enumerate(summaries.items()):
        color, _ = _style(family(group))
        axis.scatter([a * 100 for a in summary["accuracies"]], [row] * len(summary["accuracies"]), s=10,
                     color=color, alpha=0.5)
        axis.errorbar(summary["mean_accuracy"] * 100, row, xerr=summary["std_accuracy"] * 100, color=color,
                      marker="o", capsize=3)
    axis.axvline(low + 0.75 * (high - low), color="tab:red", linewidth=0.8, linestyle="--")
    # The BOPs beside each name: a variant over the budget is not "at" it, however accurate.
    ratios = [(min(s["bops"]) / verdict["budget_bops"], max(s["bops"]) / verdict["budget_bops"])
              for s in summaries.values()]
    axis.set_yticks(range(len(summaries)), [f"{g.split(' @')[0]} ({lo:.2f}–{hi:.2f}× budget)"
                                            for g, (lo, hi) in zip(summaries, ratios)], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("test accuracy (%): seeds, mean ± std")
    # In the title, not a legend: a legend in the plot covers the rows of whichever corner it takes.
    axis.set_title(f"{title}; red dashes: 75% of the gap to INT8", fontsize=9)


def plot(results, path, model_label: str):
    """Per dataset: every method as trained (top) and, below, what the re-estimated verdict compares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + any(r["verdict_with_batch_norm_reestimation"] for r in results)
    figure, axes = plt.subplots(rows, len(results), figsize=(6.5 * len(results), 4.8 * rows), squeeze=False)
    for column, result in enumerate(results):
        _panel(axes[0][column], result["summaries"], result["comparison_bops"],
               f"{result['dataset']}: {model_label}, {result['epochs']} epochs, as trained;\n"
               f"dotted: the comparison budget, {result['comparison_budget']} BOPs")
        reestimated = result["verdict_with_batch_norm_reestimation"]
        if rows > 1 and reestimated:
            _comparison_panel(axes[1][column], reestimated,
                              f"{result['dataset']} at {result['comparison_budget']} BOPs, batch norms re-estimated,\n"
                              f"seeds {','.join(map(str, reestimated['seeds']))}")
        elif rows > 1:
            axes[1][column].set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
