"""Cost: MACs from built shapes, BOPs, size, tables, targets and bounds."""

import json

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import cost


def _one_layer_model(layer, input_shape, *more_inputs):
    inputs = [keras.Input(input_shape)] + [keras.Input(shape) for shape in more_inputs]
    outputs = layer(*inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "make,input_shape,macs",
    [
        (lambda: keras.layers.Conv2D(4, 3, name="l"), (8, 8, 2), 6 * 6 * 4 * 3 * 3 * 2),
        (lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same", name="l"), (8, 8, 2), 4 * 4 * 4 * 9 * 2),
        (lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="l"),
         (8, 8, 3), 4 * 4 * 6 * 9),
        (lambda: keras.layers.Conv1D(6, 3, name="l"), (12, 4), 10 * 6 * 3 * 4),
        (lambda: keras.layers.Dense(5, name="l"), (7,), 35),
        (lambda: keras.layers.Dense(5, name="l"), (3, 7), 3 * 35),
        (lambda: keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6), name="l"), (4, 5), 4 * 5 * 6),
    ],
)
def test_hand_computed_macs(make, input_shape, macs):
    searchable = fliqs_keras.apply(_one_layer_model(make(), input_shape), ["int4", "int8"])
    (entry,) = cost.layer_costs(searchable)
    assert entry.macs == macs
    assert cost.bops(searchable, "int8") == macs * 64
    assert cost.bops(searchable, "e4m3") == macs * 64
    assert cost.bops(searchable, "bf16") == macs * 256
    kernel = searchable.get_layer("l").layer.kernel
    assert cost.size_bits(searchable, "int4") == int(np.prod(kernel.shape)) * 4


def test_attention_counts_projections_and_its_float_matmuls():
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    searchable = fliqs_keras.apply(_one_layer_model(mha, (5, 8), (7, 6)), ["int4", "int8"])
    (entry,) = cost.layer_costs(searchable)
    assert entry.macs == 5 * 8 * 8 + 7 * 6 * 8 + 7 * 6 * 8 + 5 * 8 * 8
    matmuls = 5 * 7 * 2 * (4 + 4)
    assert entry.fixed_bops == matmuls * 32 * 32
    assert cost.bops(searchable, "int8") == entry.macs * 64 + matmuls * 1024


def test_a_shared_layer_counts_every_call():
    dense = keras.layers.Dense(5, name="shared")
    a, b = keras.Input((7,)), keras.Input((7,))
    model = keras.Model([a, b], keras.layers.Add()([dense(a), dense(b)]))
    assert cost.layer_costs(fliqs_keras.apply(model, "int8"))[0].macs == 70


def test_current_formats_and_summary():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
    searchable = fliqs_keras.apply(keras.Model(inputs, outputs), {"*": ["int4", "int8"], "fc": None})
    fliqs_keras.set_formats(searchable, {"conv": "int4"})
    assert cost.bops(searchable) == 2592 * 16
    fliqs_keras.set_formats(searchable, {"conv": "int8"})
    assert cost.bops(searchable) == 2592 * 64
    table = cost.summary(searchable)
    assert "conv" in table and "int8" in table and "2,592" in table and "fc" not in table.split("total")[0]


@pytest.mark.slow  # two Keras applications built at 224 and wrapped whole (18 s)
@pytest.mark.parametrize("application,expected", [("MobileNetV2", 77.0e9), ("ResNet50", 987.6e9)])
def test_paper_bf16_costs_of_keras_applications(application, expected):
    model = getattr(keras.applications, application)(weights=None)
    searchable = fliqs_keras.apply(model, ["int4", "int8"])
    assert cost.bops(searchable, "bf16") == pytest.approx(expected, rel=0.01)


def _two_layers():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
    return fliqs_keras.apply(keras.Model(inputs, outputs), {"*": ["int2", "int4", "int8"], "fc": "int8"})


def test_targets_absolute_relative_and_out_of_bounds():
    model = cost.CostModel(_two_layers())
    fc_macs = 6 * 6 * 4 * 3
    low, high = model.bounds()
    assert low == 2592 * 4 + fc_macs * 64 and high == (2592 + fc_macs) * 64
    assert model.target("int4") == model.uniform("int4") == (2592 + fc_macs) * 16
    assert model.target("int8*0.5") == pytest.approx(0.5 * high)
    assert model.target(("int8", 0.75)) == pytest.approx(0.75 * high)
    assert model.target(100000) == 100000
    with pytest.raises(ValueError, match=r"between 38016 .* and 193536"):
        model.target("int2")  # the fc layer is fixed to int8: uniform INT2 is out of reach
    with pytest.raises(ValueError, match="outside what the search space can reach"):
        model.target(1e12)
    with pytest.raises(ValueError, match="Unknown number format 'int9x'"):
        model.target("int9x")
    with pytest.raises(ValueError, match="Bad cost target factor"):
        model.target("int8*x")


def test_size_metric_and_cost_of_an_assignment():
    model = cost.CostModel(_two_layers(), "size")
    assert model.cost({"conv": "int2", "fc": "int8"}) == 72 * 2 + 432 * 8
    with pytest.raises(ValueError, match=r"No format given for decisions \['fc'\]"):
        model.cost({"conv": "int2"})


def test_table_cost_from_a_json_file(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"conv": {"int2": 1.0, "int4": 2.0, "int8": 3.5}, "fc": {"int8": 0.5}}))
    model = cost.CostModel(_two_layers(), "table", table=path)
    assert model.cost({"conv": "int4", "fc": "int8"}) == 2.5
    assert model.bounds() == (1.5, 4.0)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read cost table"):
        cost.CostModel(_two_layers(), "table", table=path)
    path.write_text(json.dumps({"conv": {"int4": -1}, "fc": {"int8": 1}}))
    with pytest.raises(ValueError, match=r"'conv'/'int4' must be a number >= 0"):
        cost.CostModel(_two_layers(), "table", table=path)
    path.write_text(json.dumps({"conv": {"int4": 1}}))
    with pytest.raises(ValueError, match=r"no entry for layers \['fc'\]"):
        cost.CostModel(_two_layers(), "table", table=path)
    with pytest.raises(ValueError, match="needs table"):
        cost.CostModel(_two_layers(), "table")


def test_bad_models_and_metrics():
    with pytest.raises(ValueError, match="Unknown cost metric 'flops'"):
        cost.CostModel(_two_layers(), "flops")
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no searchable layers"):
        cost.bops(plain)


@pytest.mark.parametrize("metric", ["bops", "size", "table"])
def test_graph_cost_of_a_batch_of_policies_matches_the_cost_of_each(metric):
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Conv2D(3, 1, name="mix")(x)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
    space = fliqs_keras.SearchSpace({"*": ["int2", "int4", "int8"], "mix": {"weights": ["int4", "e4m3"],
                                                                             "activations": "int8"},
                                     "fc": None}, separate_activations=True)
    searchable = fliqs_keras.apply(keras.Model(inputs, outputs), space)
    table = {"conv": {"int2": 1.0, "int4": 2.0, "int8": 3.5}, "mix": {"int4": 0.25, "e4m3": 0.75},
             "fc": {"fp32": 9.0}}
    model = cost.CostModel(searchable, metric, table=table if metric == "table" else None)
    names = list(model.decisions)
    grid = np.array(list(np.ndindex(*[len(model.decisions[n]) for n in names])))
    batch = keras.ops.convert_to_numpy(model.graph_cost(grid, names))
    expected = [model.cost({n: model.decisions[n][i] for n, i in zip(names, row)}) for row in grid]
    assert batch.shape == (len(grid),)
    np.testing.assert_allclose(batch, expected, rtol=1e-6)
    assert float(model.graph_cost(grid[-1], names)) == pytest.approx(expected[-1])
