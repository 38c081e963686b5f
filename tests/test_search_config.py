"""The search's settings: one frozen config, stored with the model; a step with no way back to the callback."""

import dataclasses
import pathlib
import re

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import export
from fliqs_keras.search_config import SearchConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _searchable():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x))
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int4", "int8"])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, (64, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 64)


def test_the_config_is_frozen_validated_and_round_trips_as_a_dict():
    config = SearchConfig(target="int4*1.1", quality="loss", freeze_at=0.8, cost_table=pathlib.Path("t.json"))
    assert config.cost_credit == "exact" and config.cost_table == "t.json"
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert SearchConfig(reward="multiplicative").cost_credit == "sampled"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beta = 2.0
    with pytest.raises(ValueError, match="Unknown search settings \\['betta'\\]"):
        SearchConfig.from_dict({"betta": 1.0})
    with pytest.raises(ValueError, match="freeze_at must be a fraction in \\(warmup, 1\\]"):
        SearchConfig(warmup=0.5, freeze_at=0.4)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        SearchConfig(total_steps=0)
    with pytest.raises(ValueError, match="a SearchConfig or its settings, not both"):
        fliqs_keras.FliqsSearch(config, beta=2.0)


def test_the_search_stores_its_config_in_the_keras_file_and_the_formats_file(tmp_path):
    model = _searchable()
    config = SearchConfig(target="int4", quality="loss", warmup=0.5, seed=3, learning_rate=0.02)
    search = fliqs_keras.FliqsSearch(config)
    model.fit(*_data(), batch_size=16, epochs=1, verbose=0, callbacks=[search])
    assert model.search_config == config and search.policy_learning_rate == 0.02
    model.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").search_config == config
    policy = export.save_formats_file(model, tmp_path / "formats.json")
    assert export.load_formats_file(tmp_path / "formats.json")["search"] == config.to_dict() == policy["search"]
    broken = dict(policy, search={**policy["search"], "warmup": 2.0})
    with pytest.raises(ValueError, match="field 'search' is not a valid search config: warmup must be"):
        export.save_formats_file(broken, tmp_path / "bad.json")


def test_the_step_has_no_way_back_to_the_callback_and_the_controller_keeps_its_settings():
    model = _searchable()
    settings = dict(model.controller.get_config())
    search = fliqs_keras.FliqsSearch(quality="loss", warmup=0.0, seed=5)

    class During(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = self.model.search_step
            assert step is search.step and step.config is search.config
            assert not any(value is search for value in vars(step).values())

    model.fit(*_data(), batch_size=16, epochs=1, verbose=0, callbacks=[search, During()])
    assert model.search_step is None  # the plain step again after the search
    assert model.controller.get_config() == settings
    assert int(model.controller.updates.numpy()) == 4


def test_only_the_graph_module_reads_private_keras_attributes():
    private = re.compile(r"\._(inbound_nodes|outbound_nodes|loss_tracker|query_dense|key_dense|value_dense|"
                         r"output_dense|num_heads|key_dim|value_dim)\b|keras\.src")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in sorted((ROOT / "fliqs_keras").rglob("*.py"))
                 if path.name != "graph.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, offenders
