"""apply(model, search_space): cloning, the report, bad input, serialisation, single path."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import fliqs_keras
from fliqs_keras import layers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cnn(name="cnn"):
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (count, 12, 12, 3)).astype(np.float32), rng.integers(0, 10, count)


def test_functional_model_is_wrapped_and_reported():
    model = _cnn()
    searchable = fliqs_keras.apply(model, {"*": ["int4", "int8"], "logits": "int8", "conv9": "int2"})
    report = fliqs_keras.report(searchable)
    assert report["conv1"].status == "searched" and report["conv1"].weight_formats == ("int4", "int8")
    assert report["dw"].status == "searched"
    assert report["logits"].status == "fixed" and report["logits"].decisions == ("logits",)
    assert "batch norm" in report["bn"].reason
    assert report["pool"].reason == "no weights to quantize"
    assert report.warnings == ["search space rule 'conv9' matches no layer"]
    assert "warning: search space rule 'conv9' matches no layer" in str(report)
    assert [w.name for w in fliqs_keras.searchable_layers(searchable)] == ["conv1", "dw", "logits"]
    assert fliqs_keras.decisions(searchable) == {
        "conv1": searchable.get_layer("conv1").weight_formats,
        "dw": searchable.get_layer("dw").weight_formats,
        "logits": (fliqs_keras.formats.get("int8"),),
    }
    assert model.get_layer("conv1").__class__ is keras.layers.Conv2D, "the original is untouched"


def test_weights_carry_over_so_fp32_choices_reproduce_the_model():
    model = _cnn()
    x, y = _data()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)  # moves the batch-norm statistics away from their initial values
    searchable = fliqs_keras.apply(model, ["fp32", "int4"])
    fliqs_keras.set_formats(searchable, "fp32")
    np.testing.assert_array_equal(searchable(x).numpy(), model(x).numpy())
    fliqs_keras.set_formats(searchable, "int4")
    assert np.abs(searchable(x).numpy() - model(x).numpy()).max() > 1e-3


def test_sequential_and_nested_models():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="hidden"),
                              keras.layers.Dense(4, name="out")], name="inner")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    searchable = fliqs_keras.apply(model, {"*": ["fp32", "int8"]})
    assert [w.name for w in fliqs_keras.searchable_layers(searchable)] == ["hidden", "out", "head"]
    assert fliqs_keras.report(searchable)["inner/hidden"].status == "searched"
    fliqs_keras.set_formats(searchable, "fp32")
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(searchable(x).numpy(), model(x).numpy())
    searchable_sequential = fliqs_keras.apply(inner, "int8")
    assert isinstance(searchable_sequential, fliqs_keras.SearchModel)
    assert len(fliqs_keras.searchable_layers(searchable_sequential)) == 2
    np.testing.assert_array_equal(searchable_sequential(x).numpy().shape, (4, 4))


@pytest.mark.parametrize("application", [pytest.param("ResNet50", marks=pytest.mark.slow), "MobileNetV2"])
def test_keras_applications_are_wrapped_everywhere_and_run(application):
    model = getattr(keras.applications, application)(weights=None)
    expected = [l.name for l in model.layers
                if type(l) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)]
    searchable = fliqs_keras.apply(model, ["int4", "int8"])
    assert [w.name for w in fliqs_keras.searchable_layers(searchable)] == expected
    assert len(expected) == {"ResNet50": 54, "MobileNetV2": 53}[application]
    output = searchable(np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32))
    assert output.shape == (1, 1000) and np.isfinite(output.numpy()).all()


def test_fixed_format_space_is_plain_qat_through_the_same_path():
    model = _cnn()
    searchable = fliqs_keras.apply(model, "int8")
    assert {e.status for e in fliqs_keras.report(searchable).layers if e.weight_formats} == {"fixed"}
    x, y = _data()
    searchable.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = searchable.fit(x, y, epochs=4, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and history.history["loss"][-1] < history.history["loss"][0]
    wrappers = fliqs_keras.searchable_layers(searchable)
    assert [w.name for w in wrappers] == ["conv1", "dw", "logits"]
    for wrapper in wrappers:
        # The weights it computes with lie on the INT8 grid of their channel: at most 255 levels each.
        for frozen in wrapper.frozen_weights():
            assert frozen.fmt.name == "int8"
            codes = np.moveaxis(frozen.values, frozen.channel_axis, -1) / frozen.scale
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            assert np.abs(np.round(codes)).max() <= 127
    # The inputs are rounded too: the model differs from its float twin with the same weights.
    twin = _cnn()
    for layer in twin.layers[1:]:  # after the input layer
        source = searchable.get_layer(layer.name)
        layer.set_weights((source.layer if layers.is_searchable(source) else source).get_weights())
    difference = np.abs(keras.ops.convert_to_numpy(searchable(x)) - keras.ops.convert_to_numpy(twin(x)))
    assert 1e-4 < difference.max() < 0.1 * np.abs(keras.ops.convert_to_numpy(twin(x))).max()


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="subclassed model.*Functional or Sequential"):
        subclassed = Subclassed()
        subclassed(np.zeros((1, 3), np.float32))
        fliqs_keras.apply(subclassed)
    with pytest.raises(ValueError, match="is not built"):
        fliqs_keras.apply(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="needs a keras.Model"):
        fliqs_keras.apply(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="empty search space"):
        fliqs_keras.apply(_cnn(), [])
    with pytest.raises(ValueError, match=r"entry 'conv1': Unknown number format 'int4x'"):
        fliqs_keras.apply(_cnn(), {"conv1": "int4x"})
    with pytest.raises(ValueError, match="wraps no layer"):
        fliqs_keras.apply(_cnn(), {"*": None})


def test_unsupported_layers_are_reported_or_refused_by_name():
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.SeparableConv2D(4, 3, name="sep")(inputs)
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    report = fliqs_keras.report(fliqs_keras.apply(model, "int8"))
    assert report["sep"].status == "skipped"
    assert "unsupported layer type SeparableConv2D" in report["sep"].reason
    with pytest.raises(ValueError, match="'sep'.*SeparableConv2D cannot be quantized"):
        fliqs_keras.apply(model, {"sep": "int8"})
    left_in_float = fliqs_keras.apply(model, {"*": "int8", "sep": None})
    assert fliqs_keras.report(left_in_float)["sep"].status == "skipped"


def test_shared_decisions_need_equal_choices():
    with pytest.raises(ValueError, match="share decision 'global'"):
        fliqs_keras.apply(_cnn(), fliqs_keras.SearchSpace({"*": ["int4", "int8"], "logits": "int8"},
                                                          decisions="global"))
    searchable = fliqs_keras.apply(_cnn(), fliqs_keras.SearchSpace({"*": ["int4", "int8"]}, decisions="global"))
    assert list(fliqs_keras.decisions(searchable)) == ["global"]
    fliqs_keras.set_formats(searchable, {"global": "int4"})
    assert {w.current_formats()["global"].name for w in fliqs_keras.searchable_layers(searchable)} == {"int4"}
    with pytest.raises(ValueError, match="Unknown decisions"):
        fliqs_keras.set_formats(searchable, {"conv1": "int4"})


def _count_ops(function, *args, types=("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2",
                                       "Conv2DBackpropInput", "Conv2DBackpropFilter",
                                       "DepthwiseConv2dNativeBackpropInput",
                                       "DepthwiseConv2dNativeBackpropFilter")):
    graph_def = function.get_concrete_function(*args).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sum(node.op in types for node in nodes)


def test_no_branching_eight_choices_hold_as_many_conv_and_matmul_ops_as_one():
    x, y = _data(8)
    counts = {}
    for choices in (["int8"], ["fp32", "int2", "int3", "int4", "int8", "e5m2", "e4m3", "e2m1"]):
        searchable = fliqs_keras.apply(_cnn(), choices)
        searchable.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        step = tf.function(lambda a, b, m=searchable: m.train_step((a, b)))
        counts[len(choices)] = _count_ops(step, x, y)
    assert counts[8] == counts[1] > 0


def test_keras_file_round_trip_mid_training_keeps_every_state(tmp_path):
    x, y = _data()
    searchable = fliqs_keras.apply(_cnn(), {"*": ["int4", "int8", "e4m3"], "logits": "int8"})
    searchable.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fliqs_keras.set_formats(searchable, {"conv1": "e4m3", "dw": "int4"})
    searchable.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "searchable.keras"
    searchable.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), searchable(x).numpy())
    assert len(searchable.weights) == len(loaded.weights)
    for original, again in zip(searchable.weights, loaded.weights):
        assert original.name == again.name
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(original), keras.ops.convert_to_numpy(again))
    assert loaded.get_layer("conv1").current_formats() == {"conv1": fliqs_keras.formats.get("e4m3")}
    assert fliqs_keras.report(loaded)["dw"].weight_formats == ("int4", "int8", "e4m3")
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)  # training goes on

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", searchable(x).numpy())
    script = (
        "import sys, numpy as np, keras, fliqs_keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "np.testing.assert_array_equal(m(np.load(sys.argv[2])).numpy(), np.load(sys.argv[3]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "expected.npy")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_report_keeps_its_columns_apart_and_says_what_a_norm_is():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.GlobalAveragePooling2D(name="a_pool_with_a_long_name_indeed")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    report = fliqs_keras.report(fliqs_keras.apply(keras.Model(inputs, outputs), ["int4", "int8"]))
    lines = {line.split()[0]: line for line in str(report).splitlines()[1:]}
    # Every column is set off by at least two spaces, whatever the longest path and type.
    assert "a_pool_with_a_long_name_indeed  GlobalAveragePooling2D  skipped" in lines["a_pool_with_a_long_name_indeed"]
    assert "batch norm" in report["bn"].reason and "folds into the preceding layer" in report["bn"].reason
    assert "layer norm" in report["ln"].reason and "batch norm" not in report["ln"].reason
