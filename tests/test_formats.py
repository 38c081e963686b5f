"""Number formats: names, ranges and serialisation."""

import dataclasses

import keras
import ml_dtypes
import numpy as np
import pytest

from fliqs_keras import formats
from fliqs_keras.formats import FloatFormat, IntFormat

ML_DTYPES = {
    "e5m2": ml_dtypes.float8_e5m2,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e4m3_ieee": ml_dtypes.float8_e4m3,
    "e3m4": ml_dtypes.float8_e3m4,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "fp32": np.float32,
}


@pytest.mark.parametrize("name,dtype", sorted(ML_DTYPES.items()))
def test_float_format_facts_match_ml_dtypes(name, dtype):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(dtype)
    assert fmt.max_value == float(info.max)
    assert fmt.smallest_normal == float(info.smallest_normal)
    assert fmt.smallest_subnormal == float(info.smallest_subnormal)
    assert fmt.bits == info.bits
    assert fmt.mantissa_bits == info.nmant
    assert fmt.ml_dtype == np.dtype(dtype)
    assert formats.get(np.dtype(dtype)) == fmt


@pytest.mark.parametrize(
    "name,maximum",
    [("e4m3", 448), ("e4m3_ieee", 240), ("e5m2", 57344), ("e3m4", 15.5), ("e2m3", 7.5),
     ("e3m2", 28), ("e2m1", 6), ("fp16", 65504)],
)
def test_documented_maxima(name, maximum):
    assert formats.get(name).max_value == maximum


def _enumerate_float(exponent_bits, mantissa_bits, flavour):
    """Every finite non-negative value of a float format, from its bit patterns."""
    bias = 2 ** (exponent_bits - 1) - 1
    values = []
    top = 2**exponent_bits - 1
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**mantissa_bits):
            if flavour == "ieee" and exponent == top:
                continue
            if flavour == "fn" and exponent == top and mantissa == 2**mantissa_bits - 1:
                continue
            if exponent == 0:
                values.append(mantissa * 2.0 ** (1 - bias - mantissa_bits))
            else:
                values.append((1 + mantissa * 2.0**-mantissa_bits) * 2.0 ** (exponent - bias))
    return np.array(sorted(values))


@pytest.mark.parametrize(
    "name,split",
    [("e2m5", (2, 5, "finite")), ("e3m3", (3, 3, "finite")), ("e2m5_ieee", (2, 5, "ieee")),
     ("e5m2_fn", (5, 2, "fn")), ("e1m6", (1, 6, "finite")), ("e4m3", (4, 3, "fn"))],
)
def test_other_splits_follow_the_documented_rule(name, split):
    fmt = formats.get(name)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.flavour) == split
    values = _enumerate_float(*split)
    assert fmt.max_value == values[-1]
    assert fmt.smallest_subnormal == values[1]
    assert fmt.smallest_normal == 2.0 ** (1 - fmt.bias)
    assert fmt.name == name
    assert formats.get(fmt.name) == fmt


def test_e2m5_is_finite_with_max_7_875():
    fmt = formats.get("e2m5")
    assert fmt.flavour == "finite" and fmt.bits == 8 and fmt.max_value == 7.875


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_int_formats(bits):
    fmt = formats.get(f"int{bits}")
    assert fmt == IntFormat(bits)
    assert fmt.max_value == 2 ** (bits - 1) - 1 and fmt.min_value == -fmt.max_value
    assert fmt.levels == 2**bits - 1
    unsigned = formats.get(f"uint{bits}")
    assert unsigned.min_value == 0 and unsigned.max_value == 2**bits - 1
    assert formats.get(f"int{bits}_per_channel").per_channel


@pytest.mark.parametrize(
    "alias,canonical",
    [("fp8_e4m3", "e4m3"), ("e4m3fn", "e4m3"), ("float8_e4m3fn", "e4m3"), ("FP8_E5M2", "e5m2"),
     ("fp4", "e2m1"), ("fp4_e2m1", "e2m1"), ("fp6_e2m3", "e2m3"), ("float6_e3m2fn", "e3m2"),
     ("bfloat16", "bf16"), ("float16", "fp16"), ("e8m23", "fp32"), (" INT8 ", "int8"),
     ("fp8-e3m4", "e3m4")],
)
def test_aliases(alias, canonical):
    assert formats.get(alias) == formats.get(canonical)
    assert formats.get(alias).name == canonical


def test_ml_dtypes_ieee_e4m3_dtype_maps_to_e4m3_ieee():
    assert formats.get(ml_dtypes.float8_e4m3).name == "e4m3_ieee"


@pytest.mark.parametrize("name", ["int9x", "e4m", "float8", "int", "fp12", "e4m3_xyz", "nf4", ""])
def test_unknown_names_are_named_and_the_accepted_forms_listed(name):
    with pytest.raises(ValueError) as error:
        formats.get(name)
    assert repr(name) in str(error.value)
    assert "Accepted" in str(error.value)


@pytest.mark.parametrize("name,hint", [("fp8", "e4m3"), ("fp6", "e2m3"), ("float8_e4m3", "e4m3_ieee")])
def test_ambiguous_names_say_what_to_write(name, hint):
    with pytest.raises(ValueError, match="Ambiguous") as error:
        formats.get(name)
    assert hint in str(error.value)


@pytest.mark.parametrize("name", ["int1", "int17", "int32", "uint0"])
def test_int_bits_out_of_range(name):
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        formats.get(name)


@pytest.mark.parametrize(
    "name,message",
    [("fp6_e4m3", "8 bits, not 6"), ("e9m2", "exponent_bits"), ("e4m24", "mantissa_bits"),
     ("e1m3_ieee", "2 exponent bits"), ("e3m0_fn", "mantissa bit")],
)
def test_malformed_float_names(name, message):
    with pytest.raises(ValueError, match=message):
        formats.get(name)


def test_constructor_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="got 1"):
        IntFormat(1)
    with pytest.raises(ValueError, match="integer"):
        IntFormat(4.0)
    with pytest.raises(ValueError, match="'nan'"):
        FloatFormat(4, 3, "nan")
    with pytest.raises(ValueError, match="got 0"):
        FloatFormat(0, 3)


def test_formats_are_immutable_hashable_values():
    fmt = formats.get("e4m3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.mantissa_bits = 2
    clips = {formats.get("int4"): 1.0, formats.get("e4m3"): 2.0}
    assert clips[IntFormat(4)] == 1.0 and clips[FloatFormat(4, 3, "fn")] == 2.0
    assert formats.get("e4m3") != formats.get("e4m3_ieee")
    assert len({formats.get(n) for n in ["int8", "int8", "e5m2", "fp8_e5m2"]}) == 2


ALL_NAMES = ["int2", "int4", "uint8", "int8_per_channel", "int16", "e5m2", "e4m3", "e4m3_ieee",
             "e3m4", "e2m5", "e2m3", "e3m2", "e2m1", "fp16", "bf16", "fp32", "e2m5_ieee"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_serialisation_round_trips(name):
    fmt = formats.get(name)
    assert formats.get(formats.serialize(fmt)) == fmt
    assert str(fmt) == name
    config = keras.saving.serialize_keras_object(fmt)
    assert keras.saving.deserialize_keras_object(config) == fmt
    assert formats.get(config) == fmt
    assert type(fmt).from_config(fmt.get_config()) == fmt


def test_get_rejects_other_objects():
    with pytest.raises(ValueError, match="Cannot interpret"):
        formats.get(3.5)
    with pytest.raises(ValueError, match="No number format for dtype"):
        formats.get(np.int32)
    with pytest.raises(ValueError, match="Not a serialized number format"):
        formats.get({"bits": 4})


def test_grid_describes_the_format():
    assert formats.get("int4").grid == (-7.0, 7.0, 4, 4)
    assert formats.get("uint8").grid == (0.0, 255.0, 8, 8)
    assert formats.get("e4m3").grid == (-448.0, 448.0, 3, -6)
