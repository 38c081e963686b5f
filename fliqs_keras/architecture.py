"""What an architecture choice means: a kernel size, an expansion ratio, a stage width, a block kept or skipped.

Architecture choices are decisions of the same controller as the formats and
live in the same `FormatState`; like formats they are small frozen values
with a name (``"kernel5"``, ``"expand3"``, ``"width0.75"``, ``"keep"``,
``"skip"``). A `Dimension` is what one decision sets in a layer: a size per
choice (channels, a kernel side, or 1 and 0 for a block that runs or not).
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Any, Sequence

from fliqs_keras import formats

KINDS = ("kernel", "expand", "width", "block")
_NAME = re.compile(r"(kernel|expand)(\d+)|width(\d+(?:\.\d+)?)|(keep|skip)")


@dataclasses.dataclass(frozen=True)
class ArchitectureChoice:
    """One choice of an architecture decision.

    Args:
        kind: ``"kernel"`` (a kernel side), ``"expand"`` (an expansion ratio),
            ``"width"`` (a multiplier of a stage's channels) or ``"block"``
            (1: the block runs, 0: it is skipped).
        value: the size it stands for; a larger value always computes more.
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown architecture choice kind {self.kind!r}; expected one of {KINDS}.")
        if self.kind == "block" and self.value not in (0, 1):
            raise ValueError(f"A block choice is 1 (keep) or 0 (skip), got {self.value!r}.")
        if self.kind != "block" and not self.value > 0:
            raise ValueError(f"A {self.kind} choice must be > 0, got {self.value!r}.")
        if self.kind in ("kernel", "expand") and self.value != int(self.value):
            raise ValueError(f"A {self.kind} choice is a whole number, got {self.value!r}.")

    @property
    def name(self) -> str:
        """The choice's name, as the formats file and `chosen_formats` write it."""
        if self.kind == "block":
            return "keep" if self.value else "skip"
        if self.kind == "width":
            return f"width{self.value:g}"
        return f"{self.kind}{int(self.value)}"

    def __str__(self) -> str:
        return self.name


Choice = formats.Format | ArchitectureChoice


def get(identifier: Any) -> ArchitectureChoice:
    """The architecture choice `identifier` names: ``"kernel5"``, ``"expand6"``, ``"width0.5"``, ``"keep"``, ``"skip"``.

    Raises:
        ValueError: naming the identifier when it is not an architecture choice.
    """
    if isinstance(identifier, ArchitectureChoice):
        return identifier
    match = _NAME.fullmatch(str(identifier).strip().lower()) if isinstance(identifier, str) else None
    if match is None:
        raise ValueError(f"{identifier!r} is not an architecture choice; expected kernelK, expandE, widthW, "
                         "keep or skip.")
    kind, size, width, block = match.groups()
    if kind:
        return ArchitectureChoice(kind, int(size))
    if width:
        return ArchitectureChoice("width", float(width))
    return ArchitectureChoice("block", 1 if block == "keep" else 0)


def is_architecture(identifier: Any) -> bool:
    """Whether `identifier` is an architecture choice or names one."""
    return isinstance(identifier, ArchitectureChoice) or (
        isinstance(identifier, str) and _NAME.fullmatch(identifier.strip().lower()) is not None)


def choice(identifier: Any) -> Choice:
    """An architecture choice, or else a number format, from a value or a name.

    Raises:
        ValueError: for a name that is neither (the formats' message).
    """
    return get(identifier) if is_architecture(identifier) else formats.get(identifier)


def rank(value: Choice) -> float:
    """How much a choice computes, to order a decision's choices: a format's bits, an architecture choice's size."""
    return float(value.value) if isinstance(value, ArchitectureChoice) else float(value.bits)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """A size that one architecture decision sets in a layer.

    Args:
        decision: the decision's name.
        choices: its choices, in the decision's order.
        sizes: per choice, the size it sets here (channels, a kernel side, or
            1 and 0 for a block that runs or is skipped).
    """

    decision: str
    choices: tuple[ArchitectureChoice, ...]
    sizes: tuple[int, ...]

    def __post_init__(self):
        if not self.choices or len(self.choices) != len(self.sizes):
            raise ValueError(f"Dimension {self.decision!r} needs one size per choice, got choices "
                             f"{[c.name for c in self.choices]} and sizes {list(self.sizes)}.")
        if any(int(s) != s or s < 0 for s in self.sizes) or max(self.sizes) < 1:
            raise ValueError(f"Dimension {self.decision!r}: sizes must be whole numbers >= 0, the largest >= 1, "
                             f"got {list(self.sizes)}.")

    @property
    def maximum(self) -> int:
        """The size at the largest choice: the size the layer's weights are built at."""
        return max(self.sizes)

    def size(self, chosen: Any) -> int:
        """The size that choice `chosen` (a choice or its name) sets."""
        return self.sizes[self.choices.index(get(chosen))]

    def get_config(self) -> dict[str, Any]:
        return {"decision": self.decision, "choices": [c.name for c in self.choices], "sizes": list(self.sizes)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Dimension":
        return cls(str(config["decision"]), tuple(get(c) for c in config["choices"]),
                   tuple(int(s) for s in config["sizes"]))


@dataclasses.dataclass(frozen=True)
class CostFactor:
    """What one dimension multiplies a layer's MACs and parameters by: ``(size / maximum) ** power`` per choice."""

    decision: str
    choices: tuple[ArchitectureChoice, ...]
    fractions: tuple[Fraction, ...]

    @classmethod
    def of(cls, dimension: Dimension, power: int = 1) -> "CostFactor":
        return cls(dimension.decision, dimension.choices,
                   tuple(Fraction(s, dimension.maximum) ** power for s in dimension.sizes))

    def fraction(self, chosen: Any) -> Fraction:
        """The factor at choice `chosen` (a choice or its name)."""
        return self.fractions[self.choices.index(get(chosen))]


def dimension(decision: str, choices: Sequence[Any], sizes: Sequence[int]) -> Dimension:
    """A `Dimension` from choice names and sizes."""
    return Dimension(decision, tuple(get(c) for c in choices), tuple(int(s) for s in sizes))
