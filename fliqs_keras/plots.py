"""The figure of a search: each decision's chosen format, and how its probabilities moved.

Needs matplotlib (`fliqs_keras[examples]`); it is imported only here.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

from fliqs_keras import formats
from fliqs_keras.cost import CostModel


def search_figure(history: Sequence[Mapping[str, Any]], policy: Mapping[str, str], costs: CostModel,
                  path: str | pathlib.Path) -> pathlib.Path:
    """Writes a PNG with two panels and returns its path.

    Left: per decision, the bit width of its chosen format (integer formats
    blue, floating point orange), labelled with the format and the share of
    the model's cost that the decision's layers carry in it. Right: the
    probability of each decision's final choice at every record of
    `history` (`FliqsSearch.history`), against the training step.

    Raises:
        ValueError: when `history` is empty or does not cover the decisions of `policy`.
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
    missing = set(policy) - set(history[-1]["probabilities"])
    if missing:
        raise ValueError(f"The history has no probabilities for decisions {sorted(missing)}.")
    names = list(policy)
    chosen = {name: formats.get(fmt) for name, fmt in policy.items()}
    total = costs.cost(chosen)
    shares = dict.fromkeys(names, 0.0)
    for entry in costs.layers:
        share = costs.layer_cost(entry, chosen.get(entry.weight_decision), chosen.get(entry.activation_decision))
        owner = entry.weight_decision if entry.weight_decision in shares else entry.activation_decision
        if owner in shares:
            shares[owner] += share / total if total else 0.0

    height = max(3.0, 0.28 * len(names) + 1.2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [1, 1.4]})
    rows = range(len(names))
    colors = ["tab:orange" if isinstance(chosen[n], formats.FloatFormat) else "tab:blue" for n in names]
    left.barh(rows, [chosen[n].bits for n in names], color=colors)
    for row, name in zip(rows, names):
        left.text(chosen[name].bits + 0.2, row, f"{chosen[name].name}  {shares[name]:.0%}", va="center", fontsize=7)
    left.set_yticks(list(rows), names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("bits of the chosen format (label: format, share of the cost)")
    left.set_xlim(0, max(f.bits for f in chosen.values()) * 1.45)
    left.set_title(f"chosen formats: {costs.metric} {total:.4g}", fontsize=9)

    steps = [record["step"] for record in history]
    for name in names:
        right.plot(steps, [record["probabilities"][name][chosen[name].name] for record in history],
                   linewidth=1, label=name)
    right.set_ylim(0, 1.02)
    right.set_xlabel("training step")
    right.set_ylabel("probability of the final choice")
    right.set_title("policy during the search", fontsize=9)
    if len(names) <= 16:
        right.legend(fontsize=6, loc="lower right", ncol=2)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
