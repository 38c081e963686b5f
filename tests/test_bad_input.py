"""Hostile input: each ends in a clear error that names the bad value, never a silently broken model or file."""

import logging

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import clipping, export, formats, quantizers


def _digits_cnn(batch_norm=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, name="conv1")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def _compiled(model, space=("int2", "int4", "int8")):
    searchable = fliqs_keras.apply(model, list(space))
    searchable.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    return searchable


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return (x[:1024], y[:1024]), (x[1024:1280], y[1024:1280]), (x[1280:], y[1280:])


def test_nan_rows_in_the_training_data_leave_the_batch_norms_and_the_policy_finite(digits):
    (x, y), held_out, (x_test, _) = digits
    x = x[:512].copy()
    x[::64] = np.nan  # one NaN row in every batch of 64 but the padding
    model = _compiled(_digits_cnn(batch_norm=True))
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=held_out, warmup=0.25, learning_rate=0.05)
    model.fit(x, y[:512], epochs=2, batch_size=64, shuffle=False, verbose=0, callbacks=[search])
    bn = model.get_layer("bn")
    for variable in (bn.moving_mean, bn.moving_variance):
        assert np.isfinite(keras.ops.convert_to_numpy(variable)).all(), variable.path
    # Every step saw a NaN row: each was undone, so nothing trained and nothing moved the policy.
    assert int(model.controller.updates.numpy()) == 0 and int(model.controller.skipped.numpy()) > 0
    assert np.isfinite(model.predict(x_test, verbose=0)).all()
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in model.variables if "float" in str(v.dtype))


@pytest.mark.parametrize("options, message", [
    ({"held_out_batch_size": 0}, "held_out_batch_size must be an integer >= 1, got 0"),
    ({"held_out_batch_size": -4}, "held_out_batch_size must be an integer >= 1, got -4"),
    ({"held_out_size": 0}, "held_out_size must be an integer >= 1, got 0"),
    ({"learning_rate": float("nan")}, "learning_rate .* must be a finite number > 0, got nan"),
    ({"learning_rate": 0.0}, "learning_rate .* must be a finite number > 0, got 0.0"),
    ({"learning_rate": -0.1}, "learning_rate .* must be a finite number > 0, got -0.1"),
    ({"baseline_momentum": 1.0}, "baseline_momentum must be in \\[0, 1\\), got 1.0"),
    ({"beta": float("inf")}, "beta must be a finite number >= 0, got inf"),
])
def test_bad_search_options_are_errors_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        fliqs_keras.FliqsSearch(quality="loss", **options)


def test_held_out_labels_outside_the_models_classes_are_an_error(digits):
    (x, y), (x_held, y_held), _ = digits
    model = _compiled(_digits_cnn())
    for labels, message in ((y_held + 10, "labels outside the model's 10 classes \\[0, 9\\]"),
                            (y_held - 1, "1 labels outside|labels outside"),
                            (y_held + 0.5, "must be integer class indices")):
        search = fliqs_keras.FliqsSearch(target="int4", validation_data=(x_held, labels))
        with pytest.raises(ValueError, match=message):
            model.fit(x[:64], y[:64], epochs=1, verbose=0, callbacks=[search])


def test_an_unbatched_held_out_dataset_is_an_error_that_says_batch_it(digits):
    import tensorflow as tf

    (x, y), (x_held, y_held), _ = digits
    model = _compiled(_digits_cnn())
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=tf.data.Dataset.from_tensor_slices(
        (x_held, y_held)))
    with pytest.raises(ValueError, match="single examples .* batch it first"):
        model.fit(x[:64], y[:64], epochs=1, verbose=0, callbacks=[search])


def test_a_cost_table_that_lacks_a_pair_the_search_can_draw_is_an_error():
    model = _compiled(_digits_cnn())
    table = {"conv1": {"int2": 1.0, "int4": 2.0, "int8": 4.0}, "logits": {"int4": 1.0, "int8": 2.0}}
    with pytest.raises(ValueError, match=r"no cost for 1 \(layer, format\) pairs .*\['logits/int2'\]"):
        fliqs_keras.cost.CostModel(model, "table", table=table)


def test_a_non_finite_policy_is_an_error_never_settled(digits, caplog):
    (x, y), _, _ = digits
    model = _compiled(_digits_cnn())
    model.controller.logits.assign(np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]], np.float32))
    search = fliqs_keras.FliqsSearch(target="int4", quality="loss", warmup=0.5)
    with caplog.at_level(logging.WARNING, logger="absl"):
        with pytest.raises(FloatingPointError, match="decisions \\['logits'\\] has non-finite logits"):
            model.fit(x[:128], y[:128], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    assert not any("settled" in r.getMessage() for r in caplog.records)


def test_apply_refuses_a_searchable_model_and_a_mixed_precision_one():
    searchable = fliqs_keras.apply(_digits_cnn(), ["int4", "int8"])
    with pytest.raises(ValueError, match="already searchable .*set_formats"):
        fliqs_keras.apply(searchable, ["int4", "int8"])
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _digits_cnn()
    finally:
        keras.config.set_dtype_policy(previous)
    with pytest.raises(ValueError, match="Layer 'conv1' computes in bfloat16 .* 'float32' policy"):
        fliqs_keras.apply(model, ["int4", "int8"])


def test_numerics_front_doors_name_what_is_missing():
    with pytest.raises(ValueError, match="No number format given \\(got None\\)"):
        formats.get(None)
    with pytest.raises(ValueError, match="fake_quant needs a format .* got None"):
        quantizers.fake_quant(np.ones(4, np.float32), None)
    with pytest.raises(ValueError, match="NaN or infinity \\(1 of 3\\)"):
        clipping.calibrate(np.array([1.0, np.nan, 2.0], np.float32), "int8")


def _policy(tmp_path):
    model = _compiled(_digits_cnn(), ["int4", "int8"])
    fliqs_keras.set_formats(model, "int8")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(64, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 64), verbose=0)
    return model, export.save_formats_file(model, tmp_path / "formats.json")


def test_formats_files_that_are_garbage_or_contradict_themselves_are_errors(tmp_path):
    model, policy = _policy(tmp_path)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="garbage.json' is not text"):
        export.load_formats_file(garbage)
    contradicting = dict(policy, layers={**policy["layers"], "conv1": {**policy["layers"]["conv1"],
                                                                       "weight_format": "int4"}})
    with pytest.raises(ValueError, match="layer 'conv1' has weight_format int4, but its decision 'conv1' chooses int8"):
        export.save_formats_file(contradicting, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="chooses int8"):
        fliqs_keras.set_formats(model, contradicting)


def test_save_policy_under_a_regular_file_is_an_error_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model, policy = _policy(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="'.*file' is a file, not a folder"):
        export.save_formats_file(policy, tmp_path / "file" / "formats.json")
    before = (tmp_path / "formats.json").read_bytes()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    fliqs_keras.set_formats(model, {"conv1": "int4"})
    with pytest.raises(OSError, match="No space left"):
        export.save_formats_file(policy, tmp_path / "formats.json")
    assert (tmp_path / "formats.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "formats.json"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exported")
    model = _compiled(_digits_cnn(), ["int8", "e4m3"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (128, 8, 8, 1)).astype(np.float32)
    for fmt in ("int8", "e4m3"):
        fliqs_keras.set_formats(model, fmt)
        model.fit(x, rng.integers(0, 10, 128), verbose=0)
    # Random labels leave near-ties between logits: agreement is not what these tests check.
    export.to_tflite(model, tmp_path / "model.tflite", x, verify_samples=32, min_agreement=0.0)
    return model, x, tmp_path / "model.tflite"


def test_to_tflite_rejects_bad_representative_data_and_destinations_before_converting(exported, tmp_path):
    model, x, _ = exported
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 128 examples with NaN or infinite values \\(the first at index 3\\)"):
        export.to_tflite(model, tmp_path / "nan.tflite", nan)
    assert not (tmp_path / "nan.tflite").exists()
    with pytest.raises(ValueError, match="representative_data is uint8 .* the model takes float32"):
        export.to_tflite(model, tmp_path / "u8.tflite", (x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="reaches \\|x\\| = 255; layer 'conv1', .* trained on inputs clipped at"):
        export.to_tflite(model, tmp_path / "unscaled.tflite", x * 255)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export.to_tflite(model, tmp_path / "file" / "model.tflite", x)


def test_verify_annotations_fails_on_unreadable_metadata_and_names_a_truncated_file(exported, tmp_path):
    from fliqs_keras.export import annotations

    _, _, path = exported
    content = path.read_bytes()
    assert export.verify_annotations(content).ok and export.verify_annotations(content).checked
    broken = annotations.add_metadata(content, {})
    model_t = annotations._model(broken)
    entry = next(m for m in model_t.metadata if m.name.decode() == annotations.ANNOTATION_METADATA)
    model_t.buffers[entry.buffer].data = np.frombuffer(b"{not json", np.uint8)
    from ai_edge_litert.tools import flatbuffer_utils

    unreadable = bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))
    check = export.verify_annotations(unreadable)
    assert not check.ok and "cannot be read" in check.failures[annotations.ANNOTATION_METADATA]
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(content[:len(content) // 3])
    with pytest.raises(ValueError, match="truncated.tflite is not a readable TFLite flatbuffer"):
        export.verify_annotations(truncated)
