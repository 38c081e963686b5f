"""Searchable wrappers, one family at a time: Conv1D, Conv2D, DepthwiseConv2D, Dense, EinsumDense, MHA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fliqs_keras import clipping, layers, quantizers
from fliqs_keras.layers import AttentionQuantizeWrapper, QuantizeConfig, QuantizeWrapper

EIGHT = ["fp32", "int2", "int3", "int4", "int8", "e5m2", "e4m3", "e2m1"]

FAMILIES = {
    "Conv1D": (lambda: keras.layers.Conv1D(6, 3, name="c1"), (2, 12, 4)),
    "Conv2D": (lambda: keras.layers.Conv2D(6, 3, name="c2", activation="relu"), (2, 9, 9, 3)),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"), (2, 9, 9, 3)),
    "Dense": (lambda: keras.layers.Dense(7, name="fc"), (3, 5)),
    "EinsumDense": (lambda: keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), bias_axes="d",
                                                     name="ein"), (2, 4, 5)),
}


def _wrapped(family, choices=EIGHT):
    make, shape = FAMILIES[family]
    layer = make()
    layer.build(shape)
    rng = np.random.default_rng(0)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    wrapper = QuantizeWrapper(layer, choices)
    wrapper.build(shape)
    wrapper.calibrate_weights()
    x = rng.normal(0, 1, shape).astype(np.float32)
    return layer, wrapper, x


def _manual(layer, wrapper, x, fmt):
    """The layer on its input and kernel fake-quantized by hand, as the wrapper should."""
    index = wrapper.weight_formats.index(quantizers.formats.get(fmt))
    kernel = layer.kernel.numpy()
    channels = wrapper.quantize_config.channels("kernel", kernel.shape)
    matrix = kernel.reshape(-1, channels)
    clip = wrapper._fractions[0].numpy()[index] * np.abs(matrix).max(axis=0)
    q_kernel = quantizers.fake_quant(matrix, fmt, clip=clip, axis=1).numpy().reshape(kernel.shape)
    q_x = quantizers.fake_quant(x, fmt, clip=float(np.abs(x).max()))
    with keras.StatelessScope(state_mapping=[(layer.kernel, q_kernel)]):
        return keras.ops.convert_to_numpy(layer(q_x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_choice_is_the_layer_itself(family):
    layer, wrapper, x = _wrapped(family)
    wrapper.set_format(wrapper.weight_decision, "fp32")
    np.testing.assert_array_equal(wrapper(x).numpy(), layer(x).numpy())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", ["int4", "e4m3", "int2"])
def test_quantized_output_equals_the_layer_on_quantized_kernel_and_input(family, fmt):
    layer, wrapper, x = _wrapped(family)
    wrapper.set_format(wrapper.weight_decision, fmt)
    got = wrapper(x).numpy()
    np.testing.assert_allclose(got, _manual(layer, wrapper, x, fmt), rtol=1e-5, atol=1e-5)
    assert np.abs(got - layer(x).numpy()).max() > 1e-3, "the quantization is really applied"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_switching_among_eight_formats_never_retraces(family):
    _, wrapper, x = _wrapped(family)
    step = tf.function(lambda v: wrapper(v, training=True))
    outputs = []
    for fmt in EIGHT:
        wrapper.set_format(wrapper.weight_decision, fmt)
        outputs.append(step(x).numpy())
    assert step.experimental_get_tracing_count() == 1
    assert len({o.tobytes() for o in outputs}) == len(EIGHT)


def test_per_format_weight_clips_differ_for_int4_and_e5m2():
    layer = keras.layers.Conv2D(6, 3, name="wide")
    layer.build((None, 9, 9, 32))
    kernel = np.random.default_rng(3).normal(0, 1, (3, 3, 32, 6)).astype(np.float32)
    kernel[0, 0, 0, :] = 12.0  # an outlier in every output channel
    layer.kernel.assign(kernel)
    wrapper = QuantizeWrapper(layer, ["int4", "e5m2"])
    wrapper.build((None, 9, 9, 32))
    wrapper.calibrate_weights()
    fractions = wrapper._fractions[0].numpy()
    assert fractions.shape == (2, 6)
    assert np.all(fractions[0] < fractions[1])
    np.testing.assert_allclose(
        fractions[0], clipping.mse_fraction(kernel.reshape(-1, 6), "int4", axis=1).numpy())


def test_training_updates_the_active_formats_input_clip_only():
    _, wrapper, x = _wrapped("Dense", ["int4", "int8", "e4m3"])
    wrapper.set_format(wrapper.weight_decision, "int8")
    wrapper(x, training=True)
    wrapper(x, training=True)
    clips, counts, negative = wrapper._input_state[0]
    np.testing.assert_array_equal(counts.numpy(), [0, 2, 0])
    assert clips.numpy()[1] > 0 and clips.numpy()[0] == 0 and clips.numpy()[2] == 0
    assert float(negative.numpy()) == 1.0
    expected = clipping.mse(x[:layers.ACTIVATION_SAMPLE], "int8", fractions=layers.ACTIVATION_FRACTIONS)
    np.testing.assert_allclose(clips.numpy()[1], expected.numpy(), rtol=1e-6)


def test_nonnegative_inputs_use_the_unsigned_grid():
    layer, wrapper, x = _wrapped("Dense", ["int4"])
    x = np.abs(x)
    wrapper(x, training=True)
    assert float(wrapper._input_state[0][2].numpy()) == 0.0
    clip = float(wrapper._input_state[0][0].numpy()[0])
    # 15 unsigned levels over [0, clip], not 7.
    q_x = quantizers.fake_quant(x, "uint4", clip=clip)
    assert len(np.unique(q_x.numpy())) > 8
    kernel_mapping = wrapper._quantized_weights()
    with keras.StatelessScope(state_mapping=kernel_mapping):
        expected = layer(q_x).numpy()
    np.testing.assert_allclose(wrapper(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_are_the_clipped_straight_through_gradients_of_the_quantized_layer(family):
    layer, wrapper, x = _wrapped(family, ["int4"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(wrapper(x)))
    got_kernel, got_bias = tape.gradient(loss, [layer.kernel, layer.bias])
    # The reference: the layer itself on its quantized kernel and input, differentiated at the quantized
    # kernel; the straight-through gradient passes it on where the weight is inside its clip, else 0.
    kernel = layer.kernel.numpy()
    matrix = kernel.reshape(-1, wrapper.quantize_config.channels("kernel", kernel.shape))
    clip = wrapper._fractions[0].numpy()[0] * np.abs(matrix).max(axis=0)
    q_kernel = tf.Variable(quantizers.fake_quant(matrix, "int4", clip=clip, axis=1).numpy().reshape(kernel.shape))
    q_x = quantizers.fake_quant(x, "int4", clip=float(np.abs(x).max()))
    with tf.GradientTape() as tape:
        with keras.StatelessScope(state_mapping=[(layer.kernel, q_kernel)]):
            reference = tf.reduce_sum(tf.square(layer(q_x)))
    want_kernel, want_bias = tape.gradient(reference, [q_kernel, layer.bias])
    inside = (np.abs(matrix) <= clip).reshape(kernel.shape)
    assert 0 < inside.mean() < 1, "the int4 clip cuts some weights: both branches of the gradient are checked"
    np.testing.assert_allclose(got_kernel.numpy(), np.where(inside, want_kernel.numpy(), 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_bias.numpy(), want_bias.numpy(), rtol=1e-5, atol=1e-5)
    assert float(tf.reduce_sum(tf.abs(got_kernel))) > 0
    assert {v.name for v in wrapper.trainable_weights} == {"kernel", "bias"}


def _attention(choices=("int8",)):
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    query = np.random.default_rng(1).normal(0, 1, (2, 5, 8)).astype(np.float32)
    context = np.random.default_rng(2).normal(0, 1, (2, 7, 6)).astype(np.float32)
    mha(query, context)
    wrapper = AttentionQuantizeWrapper(mha, list(choices))
    wrapper.build(query.shape, context.shape)
    wrapper.calibrate_weights()
    return mha, wrapper, query, context


def test_attention_fp32_is_the_layer_and_int_formats_quantize_all_projections():
    mha, wrapper, query, context = _attention(["fp32", "int4"])
    np.testing.assert_array_equal(wrapper(query, context).numpy(), mha(query, context).numpy())
    wrapper.set_format("mha", "int4")
    assert len(wrapper._quantized_weights()) == 4
    assert np.abs(wrapper(query, context).numpy() - mha(query, context).numpy()).max() > 1e-3
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(query, context, training=True))
    grads = tape.gradient(loss, [mha._query_dense.kernel, mha._output_dense.kernel])
    assert all(g is not None and np.isfinite(g.numpy()).all() and float(tf.reduce_sum(tf.abs(g))) > 0
               for g in grads)
    assert wrapper._fractions[0].shape == (2, 8)  # heads x key_dim channels per format


def test_self_attention_quantizes_the_shared_input_once():
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="self")
    x = tf.constant(np.random.default_rng(4).normal(0, 1, (2, 5, 8)).astype(np.float32))
    mha(x, x)
    wrapper = AttentionQuantizeWrapper(mha, ["fp32", "int8"])
    wrapper.build(x.shape, x.shape)
    np.testing.assert_array_equal(wrapper(x, x).numpy(), mha(x, x).numpy())
    wrapper.set_format("self", "int8")
    wrapper(x, x, training=True)
    assert [state[1].numpy()[1] for state in wrapper._input_state] == [1, 0, 0]


def test_attention_cross_attention_with_key_uses_its_own_clip_table():
    _, wrapper, query, context = _attention(["int8"])
    wrapper(query, context, key=context * 3.0, training=True)
    counts = [state[1].numpy()[0] for state in wrapper._input_state]
    assert counts == [1, 1, 1]
    assert wrapper._input_state[2][0].numpy()[0] > wrapper._input_state[1][0].numpy()[0]


def test_wrapper_validation():
    with pytest.raises(ValueError, match="SeparableConv2D has no built-in QuantizeConfig"):
        QuantizeWrapper(keras.layers.SeparableConv2D(2, 3, name="sep"), ["int8"])
    with pytest.raises(ValueError, match="Unknown number format 'int9x'"):
        QuantizeWrapper(keras.layers.Dense(2), ["int9x"])
    _, wrapper, _ = _wrapped("Dense", ["int4", "int8"])
    with pytest.raises(ValueError, match="e4m3 is not among the choices"):
        wrapper.set_format("fc", "e4m3")
    with pytest.raises(ValueError, match="no decision 'conv'"):
        wrapper.set_format("conv", "int4")
    layer = keras.layers.Dense(3, name="d")
    layer.build((None, 2))
    with pytest.raises(ValueError, match="has no weight 'kernel2'"):
        QuantizeWrapper(layer, ["int8"], quantize_config=QuantizeConfig({"kernel2": -1})).build((None, 2))


def test_quantize_config_serialises():
    config = QuantizeConfig({"kernel": 2}, quantize_inputs=False)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(config))
    assert again == config
