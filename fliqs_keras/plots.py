"""The figure of a search: each decision's chosen format, and how its probabilities moved.

Needs matplotlib (`fliqs_keras[examples]`); it is imported only here.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

from fliqs_keras import architecture, formats
from fliqs_keras.cost import CostModel


def search_figure(history: Sequence[Mapping[str, Any]], chosen_formats: Mapping[str, str], costs: CostModel,
                  path: str | pathlib.Path, *, warmup_steps: int = 0, target: float | None = None,
                  accuracy: float | None = None,
                  references: Mapping[str, tuple[float, float]] | None = None) -> pathlib.Path:
    """Writes a PNG of a finished search and returns its path.

    Left: per decision, the bit width of its chosen format (integer formats
    blue, floating point orange), labelled with the format and its share of
    the model's cost. Middle: the probability of each decision's final choice
    at every record of `history` (`FliqsSearch.history`), the warm-up shaded.
    Right, when `accuracy` is given: test accuracy against cost for the
    searched formats and each reference, with the target marked.

    Args:
        history: the search's records of probabilities per step.
        chosen_formats: the format chosen for each decision.
        costs: the cost model the search used.
        path: the PNG to write.
        warmup_steps: steps of the warm-up (no policy updates), shaded.
        target: the cost target, drawn as a line.
        accuracy: the searched model's test accuracy.
        references: label -> (cost, test accuracy) of models trained for
            comparison (float, uniform formats).

    Raises:
        ValueError: when `history` is empty or does not cover the decisions.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The search figure needs matplotlib: pip install matplotlib "
                          "(or fliqs_keras[examples]).") from error
    if not history:
        raise ValueError("No probabilities were recorded: run the search before drawing it.")
    missing = set(chosen_formats) - set(history[-1]["probabilities"])
    if missing:
        raise ValueError(f"The history has no probabilities for decisions {sorted(missing)}.")
    chosen = {name: architecture.choice(fmt) for name, fmt in chosen_formats.items()}
    # The bars are the format decisions; a searched architecture's choices scale their layers' costs.
    names = [name for name, fmt in chosen.items() if not architecture.is_architecture(fmt)]
    total = costs.cost(chosen)
    shares = dict.fromkeys(names, 0.0)
    for entry in costs.layers:
        share = costs.layer_cost(entry, chosen.get(entry.weight_decision), chosen.get(entry.activation_decision),
                                 chosen)
        owner = entry.weight_decision if entry.weight_decision in shares else entry.activation_decision
        if owner in shares:
            shares[owner] += share / total if total else 0.0

    panels = 3 if accuracy is not None else 2
    height = max(3.5, 0.28 * len(names) + 1.4)
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, height),
                                gridspec_kw={"width_ratios": [1, 1.4, 1.1][:panels]})
    left, middle = axes[0], axes[1]
    rows = range(len(names))
    colors = ["tab:orange" if isinstance(chosen[n], formats.FloatFormat) else "tab:blue" for n in names]
    left.barh(rows, [chosen[n].bits for n in names], color=colors)
    for row, name in zip(rows, names):
        left.text(chosen[name].bits + 0.2, row, f"{chosen[name].name}  {shares[name]:.0%}", va="center", fontsize=7)
    left.set_yticks(list(rows), names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("bits of the chosen format (label: format, share of the cost)")
    left.set_xlim(0, max(chosen[n].bits for n in names) * 1.45)
    title = f"chosen formats: {costs.metric} {total:.4g}"
    if target:
        title += f" ({total / target:.2f}x the target)"
    left.set_title(title, fontsize=9)

    steps = [record["step"] for record in history]
    # tab20 and four dash patterns: 80 decisions before two lines look alike.
    palette = plt.get_cmap("tab20").colors
    dashes = ["-", "--", ":", "-."]
    for index, name in enumerate(names):
        middle.plot(steps, [record["probabilities"][name][chosen[name].name] for record in history],
                    linewidth=1, color=palette[index % 20], linestyle=dashes[index // 20 % 4], label=name)
    if warmup_steps:
        middle.axvspan(0, warmup_steps, color="0.9", label="warm-up (uniform draws)")
    middle.set_ylim(0, 1.02)
    middle.set_xlabel("training step")
    middle.set_ylabel("probability of the final choice")
    middle.set_title("policy during the search", fontsize=9)
    if len(names) <= 24:
        middle.legend(fontsize=6, loc="lower right", ncol=2)

    if accuracy is not None:
        right = axes[2]
        for index, (label, (cost, reference_accuracy)) in enumerate((references or {}).items()):
            right.scatter([cost], [reference_accuracy], marker="s", color=palette[2 * index % 20], label=label)
        right.scatter([total], [accuracy], marker="*", s=160, color="tab:red", label="searched formats", zorder=3)
        if target:
            right.axvline(target, color="0.4", linestyle="--", linewidth=1, label="target")
        right.set_xscale("log")
        right.set_xlabel(f"{costs.metric} (log)")
        right.set_ylabel("test accuracy")
        right.set_title(f"searched formats: accuracy {accuracy:.4f}", fontsize=9)
        right.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
