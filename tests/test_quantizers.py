"""Fake quantizers: bit-exact against independent references, one graph, STE gradients."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from fliqs_keras import formats, quantizers

ML_DTYPE_FORMATS = ["e5m2", "e4m3", "e4m3_ieee", "e3m4", "e2m3", "e3m2", "e2m1", "bf16", "fp16"]


def _all_codes(dtype):
    """Every finite value of an ml_dtypes / NumPy float dtype of at most 16 bits."""
    bits = np.dtype(dtype).itemsize * 8
    codes = np.arange(2 ** min(bits, 16), dtype=np.uint16 if bits == 16 else np.uint8)
    values = codes.view(dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


def _test_values(fmt, rng, count=100_000):
    """In-range values: every code, every tie between neighbours, the float32
    neighbours of each tie, log-uniform random values over the whole range, and
    the boundaries."""
    codes = _all_codes(fmt.ml_dtype)
    positive = codes[codes >= 0]
    ties = ((positive[1:].astype(np.float64) + positive[:-1]) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))])
    low = np.log2(fmt.smallest_subnormal) - 2
    high = np.log2(fmt.max_value)
    spread = np.exp2(rng.uniform(low, high, count)).astype(np.float32)
    edges = np.array([fmt.max_value, np.nextafter(np.float32(fmt.max_value), np.float32(0)),
                      fmt.smallest_normal, fmt.smallest_subnormal, fmt.smallest_subnormal / 2,
                      fmt.smallest_subnormal * 0.75, 0.0], np.float32)
    values = np.concatenate([positive, ties, near, spread, edges])
    values = values[np.isfinite(values) & (values <= fmt.max_value)]
    signs = rng.choice(np.array([-1, 1], np.float32), values.size)
    return np.concatenate([values, -values, values * signs]).astype(np.float32)


@tf.function(jit_compile=False)
def _graph_quant(x, grid):
    return quantizers.fake_quant(x, grid)


@tf.function(jit_compile=True)
def _xla_quant(x, grid):
    return quantizers.fake_quant(x, grid)


def _same_bits(actual, expected):
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    both_nan = np.isnan(actual) & np.isnan(expected)
    mismatch = (actual.view(np.int32) != expected.view(np.int32)) & ~both_nan
    return int(mismatch.sum()), actual[mismatch][:5], expected[mismatch][:5]


@pytest.mark.parametrize("name", ML_DTYPE_FORMATS)
def test_float_formats_equal_the_ml_dtypes_cast_bit_for_bit(name):
    fmt = formats.get(name)
    x = _test_values(fmt, np.random.default_rng(0))
    assert x.size >= 100_000
    expected = x.astype(fmt.ml_dtype).astype(np.float32)
    grid = quantizers.grid_tensor(fmt)
    for run in (_graph_quant, _xla_quant):
        mismatches, got, want = _same_bits(run(x, grid), expected)
        assert mismatches == 0, f"{name} via {run.__name__}: got {got}, want {want}"


@pytest.mark.parametrize("name", ML_DTYPE_FORMATS)
def test_eager_calls_are_bit_exact_too(name):
    # Eager CPU kernels flush float32 subnormals, which are bf16's subnormals.
    fmt = formats.get(name)
    x = _test_values(fmt, np.random.default_rng(1), count=20_000)
    mismatches, got, want = _same_bits(
        quantizers.fake_quant(x, name), x.astype(fmt.ml_dtype).astype(np.float32)
    )
    assert mismatches == 0, f"{name}: got {got}, want {want}"


def test_fp32_is_the_identity_subnormals_included():
    x = np.concatenate([np.random.default_rng(6).normal(0, 1, 1000), [1e-39, -3e-45, 2.0**-126, 3e38]])
    x = x.astype(np.float32)
    assert _same_bits(quantizers.fake_quant(x, "fp32"), x)[0] == 0


def _reference_round(x, values):
    """Round-to-nearest-even onto a sorted set of non-negative `values` (the format's
    codes in order), saturating at the largest: written from the definition."""
    magnitude = np.minimum(np.abs(x).astype(np.float64), values[-1])
    upper = np.clip(np.searchsorted(values, magnitude), 1, len(values) - 1)
    lower = upper - 1
    below, above = values[lower], values[upper]
    pick_upper = (above - magnitude < magnitude - below) | (
        (above - magnitude == magnitude - below) & (upper % 2 == 0)
    )
    result = np.where(pick_upper, above, below)
    result = np.where(magnitude == values[upper], values[upper], result)
    return np.copysign(result, x).astype(np.float32)


def _format_values(fmt):
    """Non-negative values of a float format, enumerated from its bit patterns."""
    top = 2**fmt.exponent_bits - 1
    values = []
    for exponent in range(top + 1):
        for mantissa in range(2**fmt.mantissa_bits):
            if fmt.flavour == "ieee" and exponent == top:
                continue
            if fmt.flavour == "fn" and exponent == top and mantissa == 2**fmt.mantissa_bits - 1:
                continue
            significand = mantissa * 2.0**-fmt.mantissa_bits + (exponent > 0)
            values.append(significand * 2.0 ** (max(exponent, 1) - fmt.bias))
    return np.array(values)


@pytest.mark.parametrize("name", ["e2m5", "e2m5_ieee", "e3m3", "e1m4", "e5m2_fn", "e3m4", "e2m1"])
def test_formats_without_ml_dtypes_match_a_numpy_reference(name):
    fmt = formats.get(name)
    values = _format_values(fmt)
    assert np.all(np.diff(values) > 0), "codes in order: the even code is the even index"
    rng = np.random.default_rng(2)
    ties = (values[1:] + values[:-1]) / 2
    spread = np.exp2(rng.uniform(np.log2(fmt.smallest_subnormal) - 2, np.log2(fmt.max_value) + 1, 100_000))
    x = np.concatenate([values, ties, spread, [fmt.max_value * 3, 1e30]]).astype(np.float32)
    x = np.concatenate([x, -x])
    got = _graph_quant(x, quantizers.grid_tensor(fmt)).numpy()
    mismatches, bad, want = _same_bits(got, _reference_round(x, values))
    assert mismatches == 0, f"{name}: got {bad}, want {want}"


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8", "int16", "uint4", "uint8"])
def test_integer_formats_match_numpy_per_tensor(name):
    fmt = formats.get(name)
    rng = np.random.default_rng(3)
    clip = np.float32(2.5)
    scale = clip / np.float32(fmt.max_value)
    levels = np.arange(fmt.min_value, fmt.max_value + 1, dtype=np.float32)
    ties = ((levels[:-1] + 0.5) * scale).astype(np.float32)
    x = np.concatenate([rng.normal(0, 2, 100_000), ties, levels * scale, [-1e9, 1e9, np.inf, -np.inf]])
    x = x.astype(np.float32)
    expected = np.clip(np.round(x / scale), fmt.min_value, fmt.max_value).astype(np.float32) * scale
    if not fmt.signed:
        expected += np.float32(0.0)  # negatives saturate to +0, not -0
    got = quantizers.fake_quant(x, name, clip=float(clip))
    mismatches, bad, want = _same_bits(got, expected)
    assert mismatches == 0, f"{name}: got {bad}, want {want}"


def test_integer_per_channel_clip_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (3, 3, 16, 32)).astype(np.float32)
    clip = np.abs(x).max(axis=(0, 1, 2)).astype(np.float32) * 0.7
    scale = clip / np.float32(7)
    expected = np.clip(np.round(x / scale), -7, 7) * scale
    got = quantizers.fake_quant(x, "int4", clip=clip, axis=-1).numpy()
    assert _same_bits(got, expected.astype(np.float32))[0] == 0
    got_axis0 = quantizers.fake_quant(np.moveaxis(x, -1, 0), "int4", clip=clip, axis=0).numpy()
    np.testing.assert_array_equal(got_axis0, np.moveaxis(got, -1, 0))
    assert len(np.unique(got[..., 0] / scale[0])) <= 15


def test_saturation_never_gives_inf_or_nan():
    for name in ["e5m2", "e4m3", "e4m3_ieee", "e3m4", "e2m1", "fp16", "int8"]:
        fmt = formats.get(name)
        x = np.array([fmt.max_value * 1.01, fmt.max_value * 4, 1e38, np.inf], np.float32)
        x = np.concatenate([x, -x])
        got = quantizers.fake_quant(x, name).numpy()
        np.testing.assert_array_equal(got, np.sign(x) * fmt.max_value)


def test_one_traced_graph_serves_every_format_and_clip():
    names = ["int2", "int4", "int8", "e5m2", "e4m3", "e3m4", "e2m5", "e2m1", "bf16", "uint8"]
    grids = quantizers.grid_table(names)

    @tf.function
    def quantize(x, grid, clip):
        return quantizers.fake_quant(x, grid, clip=clip)

    x = np.random.default_rng(5).normal(0, 1, 4096).astype(np.float32)
    for i, name in enumerate(names):
        got = quantize(x, grids[i], tf.constant(3.0))
        np.testing.assert_array_equal(got.numpy(), quantizers.fake_quant(x, name, clip=3.0).numpy())
    assert quantize.experimental_get_tracing_count() == 1
    graph_def = quantize.get_concrete_function(x, grids[0], tf.constant(3.0)).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    assert sum(node.op == "Round" for node in nodes) == 1, "one quantizer, whatever the format"


def test_switching_a_variable_format_inside_a_compiled_step():
    names = ["int4", "e4m3", "int8"]
    table = quantizers.grid_table(names)
    choice = tf.Variable(0)

    @tf.function(jit_compile=True)
    def step(x):
        return quantizers.fake_quant(x, tf.gather(table, choice), clip=2.0)

    x = np.linspace(-3, 3, 1001).astype(np.float32)
    for i, name in enumerate(names):
        choice.assign(i)
        np.testing.assert_array_equal(step(x).numpy(), quantizers.fake_quant(x, name, clip=2.0).numpy())
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", ["int4", "e4m3", "e5m2", "uint8"])
def test_straight_through_gradient_inside_the_clip_zero_outside(name):
    fmt = formats.get(name)
    clip = 1.5
    x = tf.constant(np.linspace(-3, 3, 241).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizers.fake_quant(x, name, clip=clip)
        loss = tf.reduce_sum(y * tf.range(241, dtype=tf.float32))
    grad = tape.gradient(loss, x).numpy()
    low = fmt.min_value / fmt.max_value * clip
    inside = (x.numpy() >= low) & (x.numpy() <= clip)
    np.testing.assert_array_equal(grad, np.where(inside, np.arange(241), 0).astype(np.float32))


def test_no_gradient_reaches_the_clip_and_per_channel_masks_per_channel():
    clip = tf.Variable([1.0, 2.0])
    x = tf.constant([[1.5, 1.5], [0.5, 2.5]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = quantizers.fake_quant(x, "int8", clip=clip, axis=1)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [[0.0, 1.0], [1.0, 0.0]])
    assert tape.gradient(y, clip) is None


def test_gradient_under_xla():
    @tf.function(jit_compile=True)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizers.fake_quant(x, "e4m3", clip=1.0)
        return tape.gradient(y, x)

    np.testing.assert_array_equal(grad(tf.constant([0.3, 2.0, -1.0, -1.1])).numpy(), [1, 0, 1, 0])


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf"), [1.0, -2.0]])
def test_bad_python_clip_is_an_error(clip):
    with pytest.raises(ValueError, match="clip must be finite and > 0"):
        quantizers.fake_quant(np.ones(2, np.float32), "int8", clip=clip, axis=0)


def test_zero_clip_tensor_gives_zeros_not_nan():
    x = tf.zeros((4, 3))
    np.testing.assert_array_equal(quantizers.fake_quant(x, "int4", clip=tf.reduce_max(x)).numpy(), x)


def test_shape_errors_name_the_problem():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="needs `axis`"):
        quantizers.fake_quant(x, "int8", clip=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        quantizers.fake_quant(x, "int8", clip=np.ones(4, np.float32), axis=1)
    with pytest.raises(ValueError, match="out of range"):
        quantizers.fake_quant(x, "int8", clip=np.ones(3, np.float32), axis=2)
    with pytest.raises(ValueError, match="shape \\[4\\]"):
        quantizers.fake_quant(x, tf.zeros(3))
    with pytest.raises(ValueError, match="float input"):
        quantizers.fake_quant(np.ones(3, np.int32), "int8")
    with pytest.raises(ValueError, match="Unknown number format 'int4x'"):
        quantizers.fake_quant(x, "int4x")
    with pytest.raises(ValueError, match="at least one"):
        quantizers.grid_table([])


def test_nan_propagates_and_neighbours_are_untouched():
    x = np.array([np.nan, 1.0, -np.nan, 0.3], np.float32)
    for name in ["int4", "e4m3", "e2m1", "bf16"]:
        got = quantizers.fake_quant(x, name, clip=1.0).numpy()
        assert np.isnan(got[0]) and np.isnan(got[2])
        np.testing.assert_array_equal(got[[1, 3]], quantizers.fake_quant(x[[1, 3]], name, clip=1.0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x = tf.cast(tf.linspace(-2.0, 2.0, 101), dtype)
    y = quantizers.fake_quant(x, "e4m3", clip=2.0)
    assert y.dtype == x.dtype
    expected = tf.cast(quantizers.fake_quant(tf.cast(x, tf.float32), "e4m3", clip=2.0), dtype)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


@pytest.mark.parametrize("name,clip", [("bf16", 0.3), ("fp32", 0.3), ("bf16", 1e5), ("fp16", 1e-3)])
def test_wide_formats_with_a_small_clip_saturate_at_the_clip_and_round_exactly(name, clip):
    # The scale clip / max underflows float32 for bf16 and fp32; it is floored at
    # a power of two, so rounding stays exact and saturation stays at the clip.
    fmt = formats.get(name)
    x = np.random.default_rng(7).normal(0, clip, 10_000).astype(np.float32)
    got = quantizers.fake_quant(x, name, clip=clip).numpy()
    # Saturation is at the clip rounded into the format (0.3 is no bf16 value).
    assert np.abs(got).max() <= clip * (1 + 2.0**-fmt.mantissa_bits)
    if clip / fmt.max_value < 2.0**-126:
        expected = np.clip(x, -np.float32(clip), np.float32(clip)).astype(fmt.ml_dtype).astype(np.float32)
        assert _same_bits(got, expected)[0] == 0
    assert np.abs(got - np.clip(x, -clip, clip)).max() <= clip * 2.0 ** -fmt.mantissa_bits
