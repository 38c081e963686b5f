"""One home for the formats: the layers, chosen_formats(), report(), the cost, the formats file and the export agree."""

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import cost, export
from fliqs_keras.format_state import FormatState
from fliqs_keras.layers import QuantizeWrapper


def _trained(seed=0):
    """A small searchable CNN with a few training steps in each of its formats (so every input has a clip)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int4", "int8"])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    x, y = rng.normal(0, 1, (64, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 64)
    for fmt in ("int4", "int8"):
        fliqs_keras.set_formats(model, fmt)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return model, x


def _layers_hold(model):
    return {name: fmt.name for w in fliqs_keras.searchable_layers(model) for name, fmt in w.current_formats().items()}


def test_set_formats_reaches_the_layers_report_cost_and_formats_file():
    model, _ = _trained()
    fliqs_keras.set_formats(model, "int8")
    everywhere_int8 = {"conv1": "int8", "logits": "int8"}
    assert fliqs_keras.chosen_formats(model) == everywhere_int8
    assert _layers_hold(model) == everywhere_int8
    assert fliqs_keras.report(model)["conv1"].current == ("int8",)
    assert "now int8" in str(fliqs_keras.report(model))
    costs = cost.CostModel(model)
    assert cost.bops(model) == costs.uniform("int8") == costs.cost(fliqs_keras.chosen_formats(model))
    assert export.build_formats_file(model)["decisions"] == everywhere_int8
    fliqs_keras.set_formats(model, {"logits": "int4"})
    assert fliqs_keras.chosen_formats(model) == _layers_hold(model) == {"conv1": "int8", "logits": "int4"}


def test_a_loaded_formats_file_applies_to_the_searchable_model(tmp_path):
    model, x = _trained()
    fliqs_keras.set_formats(model, {"conv1": "int4", "logits": "int8"})
    written = export.save_formats_file(model, tmp_path / "formats.json")
    expected_output = keras.ops.convert_to_numpy(model(x[:4]))
    fliqs_keras.set_formats(model, "int8")
    fliqs_keras.set_formats(model, export.load_formats_file(tmp_path / "formats.json"))
    assert fliqs_keras.chosen_formats(model) == _layers_hold(model) == {"conv1": "int4", "logits": "int8"}
    assert export.build_formats_file(model) == written
    assert cost.bops(model) == written["total"]["bops"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x[:4])), expected_output)
    other = dict(written, decisions={"conv1": "int4"})
    with pytest.raises(ValueError, match="layer 'logits' names decision 'logits', which has no format"):
        fliqs_keras.set_formats(model, other)


def test_the_formats_live_in_the_models_state_only():
    model, _ = _trained()
    # No layer holds a format variable of its own: the model's state is the one source.
    names = [v.path for w in fliqs_keras.searchable_layers(model) for v in w.variables]
    assert not [n for n in names if "format" in n], names
    assert model.format_state.names == ["conv1", "logits"]
    model.format_state.assign(np.array([1, 0], np.int32))
    assert fliqs_keras.chosen_formats(model) == _layers_hold(model) == {"conv1": "int8", "logits": "int4"}
    with pytest.raises(ValueError, match="already belongs to another searchable model"):
        fliqs_keras.SearchModel(model.inputs, model.outputs)


def test_a_saved_model_keeps_its_formats(tmp_path):
    model, x = _trained()
    fliqs_keras.set_formats(model, {"conv1": "int8", "logits": "int4"})
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert fliqs_keras.chosen_formats(loaded) == _layers_hold(loaded) == {"conv1": "int8", "logits": "int4"}
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x[:4])),
                               keras.ops.convert_to_numpy(model(x[:4])), rtol=1e-6, atol=1e-6)


def test_a_wrapper_used_alone_keeps_its_formats_in_its_config():
    layer = keras.layers.Dense(3, name="fc")
    layer.build((2, 5))
    wrapper = QuantizeWrapper(layer, ["int4", "int8"])
    wrapper.build((2, 5))
    wrapper.set_format("fc", "int8")
    again = QuantizeWrapper.from_config(wrapper.get_config())
    assert again.current_formats() == {"fc": fliqs_keras.formats.get("int8")}


def test_kept_formats_take_the_place_of_a_fallback_until_cleared():
    state = FormatState({"a": ["int4", "int8"], "b": ["int2", "int4", "int8"]})
    np.testing.assert_array_equal(state.kept_or(np.array([1, 0])).numpy(), [1, 0])
    state.keep([0, 2])
    np.testing.assert_array_equal(state.kept_or(np.array([1, 0])).numpy(), [0, 2])
    state.keep(None)
    np.testing.assert_array_equal(state.kept_or(np.array([1, 0])).numpy(), [1, 0])
    for bad in ([0, 3], [2, 0], [0]):  # decision a has two choices, decision b three
        with pytest.raises(ValueError, match="one valid choice index per decision"):
            state.keep(bad)
    with pytest.raises(ValueError, match="Decision 'a': e4m3 is not among its choices"):
        state.set({"a": "e4m3"})
    with pytest.raises(ValueError, match="Unknown decision 'c'"):
        state.set({"c": "int4"})
    assert {n: f.name for n, f in state.formats().items()} == {"a": "int4", "b": "int2"}
