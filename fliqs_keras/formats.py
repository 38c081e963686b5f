"""Number formats: what a name such as "int4", "e4m3" or "bf16" means.

Formats are small frozen dataclasses holding facts about the numbers (width,
range, resolution), each also described by a four-number `Grid`; the
arithmetic lives in `quantizers`. Naming rules: docs/formats.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Union

import keras
import ml_dtypes
import numpy as np

FLAVOURS = ("ieee", "fn", "finite")
"""IEEE-like (inf and NaN in the top exponent), OCP "fn" (finite, NaN at the
all-ones code only) and MX-style finite (no inf, no NaN)."""

MIN_INT_BITS, MAX_INT_BITS = 2, 16


class Grid(NamedTuple):
    """The values of a format as the quantizer sees them.

    Representable values are ``k * 2**(max(e, min_exponent) - mantissa_bits)``
    for integers ``k``, where ``e`` is the exponent of the value, clamped to
    ``[low, high]``. For an integer format ``min_exponent = mantissa_bits =
    bits``, so the spacing is always 1.
    """

    low: float
    high: float
    mantissa_bits: int
    min_exponent: int


@keras.saving.register_keras_serializable(package="fliqs_keras")
@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A symmetric signed (or unsigned) integer format of 2 to 16 bits."""

    bits: int
    signed: bool = True
    per_channel: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ValueError(f"IntFormat bits must be an integer, got {self.bits!r}.")
        if not MIN_INT_BITS <= self.bits <= MAX_INT_BITS:
            raise ValueError(
                f"IntFormat bits must be in [{MIN_INT_BITS}, {MAX_INT_BITS}], got {self.bits}."
            )
        object.__setattr__(self, "bits", int(self.bits))

    is_float = False

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``int4`` or ``uint8``."""
        base = f"{'' if self.signed else 'u'}int{self.bits}"
        return base + ("_per_channel" if self.per_channel else "")

    @property
    def max_value(self) -> float:
        """The largest level at unit scale (the value a clip threshold maps to)."""
        return float(2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1)

    @property
    def min_value(self) -> float:
        """The smallest representable value."""
        return -self.max_value if self.signed else 0.0

    @property
    def levels(self) -> int:
        """How many distinct values the format uses (symmetric: one code unused)."""
        return int(self.max_value - self.min_value) + 1

    @property
    def grid(self) -> Grid:
        """The format as the quantizer's four-number `Grid`."""
        return Grid(self.min_value, self.max_value, self.bits, self.bits)

    def __str__(self) -> str:
        return self.name

    def get_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "per_channel": self.per_channel}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "IntFormat":
        return cls(**config)


@keras.saving.register_keras_serializable(package="fliqs_keras")
@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A sign bit, `exponent_bits` exponent bits and `mantissa_bits` mantissa bits.

    The exponent bias is ``2**(exponent_bits - 1) - 1`` and subnormals are
    always present; `flavour` says which codes are not numbers (see `FLAVOURS`).
    """

    exponent_bits: int
    mantissa_bits: int
    flavour: str = "ieee"

    def __post_init__(self):
        for field, low, high in (("exponent_bits", 1, 8), ("mantissa_bits", 0, 23)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"FloatFormat {field} must be an integer, got {value!r}.")
            if not low <= value <= high:
                raise ValueError(f"FloatFormat {field} must be in [{low}, {high}], got {value}.")
            object.__setattr__(self, field, int(value))
        if self.flavour not in FLAVOURS:
            raise ValueError(
                f"FloatFormat flavour must be one of {FLAVOURS}, got {self.flavour!r}."
            )
        if self.flavour == "ieee" and self.exponent_bits < 2:
            raise ValueError("An IEEE-like float needs at least 2 exponent bits (one is reserved).")
        if self.flavour == "fn" and self.mantissa_bits < 1:
            raise ValueError("An 'fn' float needs a mantissa bit (its NaN is S.1...1.1...1).")

    is_float = True

    @property
    def bits(self) -> int:
        """Total width: sign, exponent and mantissa bits."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """The exponent bias."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``e4m3`` or ``bf16``."""
        split = f"e{self.exponent_bits}m{self.mantissa_bits}"
        special = _SPECIAL_NAMES.get((self.exponent_bits, self.mantissa_bits, self.flavour))
        if special:
            return special
        if self.flavour == _default_flavour(self.exponent_bits, self.mantissa_bits):
            return split
        return f"{split}_{self.flavour}"

    @property
    def max_exponent(self) -> int:
        """The largest unbiased exponent of a finite value."""
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.flavour == "ieee" else top) - self.bias

    @property
    def max_value(self) -> float:
        # "fn" gives up the all-ones mantissa of the top exponent to NaN.
        """The largest finite value."""
        lost = 2 if self.flavour == "fn" else 1
        mantissa = 2.0 - lost * 2.0**-self.mantissa_bits
        return float(mantissa * 2.0**self.max_exponent)

    @property
    def min_value(self) -> float:
        """The most negative finite value."""
        return -self.max_value

    @property
    def min_exponent(self) -> int:
        """The unbiased exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def smallest_normal(self) -> float:
        """The smallest positive normal value."""
        return float(2.0**self.min_exponent)

    @property
    def smallest_subnormal(self) -> float:
        """The smallest positive subnormal value."""
        return float(2.0 ** (self.min_exponent - self.mantissa_bits))

    @property
    def grid(self) -> Grid:
        """The format as the quantizer's four-number `Grid`."""
        return Grid(self.min_value, self.max_value, self.mantissa_bits, self.min_exponent)

    @property
    def ml_dtype(self) -> np.dtype | None:
        """The matching `ml_dtypes`/NumPy dtype, or None where none exists."""
        for dtype, fmt in _DTYPE_FORMATS.items():
            if fmt == self:
                return np.dtype(dtype)
        return None

    def __str__(self) -> str:
        return self.name

    def get_config(self) -> dict[str, Any]:
        return {
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "flavour": self.flavour,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FloatFormat":
        return cls(**config)


Format = Union[IntFormat, FloatFormat]

# Splits whose meaning is fixed by a standard; every other split is MX-style finite.
_STANDARD_FLAVOURS = {(5, 2): "ieee", (4, 3): "fn", (3, 4): "ieee", (5, 10): "ieee",
                      (8, 7): "ieee", (8, 23): "ieee"}
_SPECIAL_NAMES = {(5, 10, "ieee"): "fp16", (8, 7, "ieee"): "bf16", (8, 23, "ieee"): "fp32"}
_DTYPE_FORMATS = {
    ml_dtypes.float8_e5m2: FloatFormat(5, 2, "ieee"),
    ml_dtypes.float8_e4m3fn: FloatFormat(4, 3, "fn"),
    ml_dtypes.float8_e4m3: FloatFormat(4, 3, "ieee"),
    ml_dtypes.float8_e3m4: FloatFormat(3, 4, "ieee"),
    ml_dtypes.float6_e2m3fn: FloatFormat(2, 3, "finite"),
    ml_dtypes.float6_e3m2fn: FloatFormat(3, 2, "finite"),
    ml_dtypes.float4_e2m1fn: FloatFormat(2, 1, "finite"),
    ml_dtypes.bfloat16: FloatFormat(8, 7, "ieee"),
    np.float16: FloatFormat(5, 10, "ieee"),
    np.float32: FloatFormat(8, 23, "ieee"),
}
_ALIASES = {
    "fp4": "e2m1", "fp16": "e5m10", "float16": "e5m10", "half": "e5m10",
    "bf16": "e8m7", "bfloat16": "e8m7", "fp32": "e8m23", "float32": "e8m23",
    "float8_e5m2": "e5m2", "float8_e4m3fn": "e4m3", "e4m3fn": "e4m3",
    "float8_e3m4": "e3m4", "float6_e2m3fn": "e2m3", "float6_e3m2fn": "e3m2",
    "float4_e2m1fn": "e2m1",
}
_AMBIGUOUS = {
    "fp8": "FP8 has several splits: say e5m2, e4m3 (OCP, max 448), e4m3_ieee, e3m4 or e2m5",
    "fp6": "FP6 has two splits: say e2m3 (max 7.5) or e3m2 (max 28)",
    "float8_e4m3": ("'float8_e4m3' means the IEEE-like E4M3 in ml_dtypes but OCP E4M3 elsewhere: "
                    "say e4m3 (OCP, max 448) or e4m3_ieee (max 240)"),
}
_INT_RE = re.compile(r"^(u?)int(\d+)(_per_channel)?$")
_FLOAT_RE = re.compile(r"^(?:fp(\d+)_)?e(\d+)m(\d+)(?:_(ieee|fn|finite))?$")
ACCEPTED = (
    "int2 ... int16 and uint2 ... uint16 (optionally with the suffix _per_channel); "
    "e5m2, e4m3 (OCP, = e4m3fn), e4m3_ieee, e3m4, e2m5, e2m3, e3m2, e2m1; any eXmY with an "
    "optional fpN_ prefix (fp8_e4m3) and an optional _ieee, _fn or _finite suffix; "
    "fp4, fp16, bf16, fp32; the ml_dtypes names (float8_e4m3fn, float6_e2m3fn, ...)"
)


def _default_flavour(exponent_bits: int, mantissa_bits: int) -> str:
    return _STANDARD_FLAVOURS.get((exponent_bits, mantissa_bits), "finite")


def _parse(name: str) -> Format:
    key = name.strip().lower().replace("-", "_")
    if key in _AMBIGUOUS:
        raise ValueError(f"Ambiguous number format {name!r}: {_AMBIGUOUS[key]}.")
    key = _ALIASES.get(key, key)
    match = _INT_RE.match(key)
    if match:
        unsigned, bits, per_channel = match.groups()
        try:
            return IntFormat(int(bits), signed=not unsigned, per_channel=bool(per_channel))
        except ValueError as error:
            raise ValueError(f"Bad number format {name!r}: {error}") from None
    match = _FLOAT_RE.match(key)
    if match:
        total, exponent_bits, mantissa_bits, flavour = match.groups()
        exponent_bits, mantissa_bits = int(exponent_bits), int(mantissa_bits)
        flavour = flavour or _default_flavour(exponent_bits, mantissa_bits)
        try:
            fmt = FloatFormat(exponent_bits, mantissa_bits, flavour)
        except ValueError as error:
            raise ValueError(f"Bad number format {name!r}: {error}") from None
        if total is not None and int(total) != fmt.bits:
            raise ValueError(
                f"Bad number format {name!r}: e{exponent_bits}m{mantissa_bits} has "
                f"{fmt.bits} bits, not {total}."
            )
        return fmt
    raise ValueError(f"Unknown number format {name!r}. Accepted: {ACCEPTED}.")


def get(identifier: Any) -> Format:
    """Returns the format that `identifier` names.

    Args:
        identifier: a format object (returned as is), a name (see the module
            docstring), a NumPy / ml_dtypes float dtype, or a config dict as
            written by `serialize` or `keras.saving.serialize_keras_object`.

    Raises:
        ValueError: for an unknown, ambiguous or malformed identifier; the
            message names it and lists the accepted forms.
    """
    if isinstance(identifier, (IntFormat, FloatFormat)):
        return identifier
    if identifier is None:
        raise ValueError(f"No number format given (got None). Accepted: {ACCEPTED}.")
    if isinstance(identifier, str):
        return _parse(identifier)
    if isinstance(identifier, dict):
        if "class_name" in identifier:
            fmt = keras.saving.deserialize_keras_object(identifier)
            if isinstance(fmt, (IntFormat, FloatFormat)):
                return fmt
        raise ValueError(f"Not a serialized number format: {identifier!r}.")
    try:
        dtype = np.dtype(identifier)
    except TypeError:
        raise ValueError(
            f"Cannot interpret {identifier!r} as a number format. Accepted: {ACCEPTED}."
        ) from None
    for known, fmt in _DTYPE_FORMATS.items():
        if np.dtype(known) == dtype:
            return fmt
    raise ValueError(f"No number format for dtype {dtype}. Accepted: {ACCEPTED}.")


def serialize(fmt: Any) -> str:
    """The canonical name of a format; `get(serialize(f)) == f` for every format."""
    return get(fmt).name
