"""The joint architecture and format search: choices, masked blocks, the searchable MobileNetV2, its cost and export."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import fliqs_keras
from fliqs_keras import architecture, blocks, cost, data, models, plots
from fliqs_keras.export import chosen_architecture

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Three stages of MobileNetV2 (an expansion-1 block, then two stages of two blocks) at width 0.5 on 8x8 digits:
# every kind of decision (kernel, expansion, skip, a stage width) in a model that builds in a second.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1))
TINY = dict(input_shape=(8, 8, 1), classes=10, width=0.5, small_input=True, stages=STAGES)
# A kernel per block (5), an expansion per block but the first (4), a skip for the two later blocks, and the
# width of the two stages of 16 channels (8 or 16).
ARCHITECTURE_DECISIONS = 13


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def digits():
    return data.sklearn_digits(seed=0)


def _random_choices(model, seed):
    rng = np.random.RandomState(seed)
    choices = fliqs_keras.decisions(model)
    return {name: choices[name][rng.randint(len(choices[name]))].name for name in model.decision_names}


def test_choices_have_names_that_round_trip_and_bad_ones_are_named():
    for name in ("kernel5", "expand3", "width0.75", "width1", "keep", "skip"):
        assert architecture.get(name).name == name
        assert architecture.choice(name) == architecture.get(name)
    assert architecture.choice("int4") == fliqs_keras.formats.get("int4")
    assert architecture.rank(architecture.get("kernel7")) > architecture.rank(architecture.get("kernel3"))
    with pytest.raises(ValueError, match="'kernel' is not an architecture choice"):
        architecture.get("kernel")
    with pytest.raises(ValueError, match="A kernel choice must be > 0"):
        architecture.ArchitectureChoice("kernel", 0)
    with pytest.raises(ValueError, match="one size per choice"):
        architecture.dimension("d", ["kernel3", "kernel5"], [3])
    with pytest.raises(ValueError, match="kernel sides must be odd"):
        blocks.MaskedDepthwiseConv2D(4, kernel=architecture.dimension("k", ["kernel2", "kernel4"], [2, 4]))


def test_masked_layers_compute_what_the_plain_layer_of_the_choice_computes():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 9, 9, 6).astype("float32")
    kernel = architecture.dimension("k", ["kernel3", "kernel5", "kernel7"], [3, 5, 7])
    masked = blocks.MaskedDepthwiseConv2D(7, padding="same", use_bias=False, kernel=kernel,
                                          initial_choices={"k": "kernel3"})
    masked.build(x.shape)
    plain = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)
    plain.build(x.shape)
    plain.set_weights([masked.get_weights()[0][2:5, 2:5]])
    np.testing.assert_allclose(masked(x), plain(x), atol=1e-5)

    channels = architecture.dimension("c", ["expand3", "expand6"], [2, 6])
    mask = blocks.ChannelMask(channels, initial_choices={"c": "expand3"})
    out = keras.ops.convert_to_numpy(mask(x))
    np.testing.assert_array_equal(out[..., :2], x[..., :2])
    assert not out[..., 2:].any()

    skip = blocks.SkippableAdd(architecture.dimension("s", ["skip", "keep"], [0, 1]), initial_choices={"s": "skip"})
    np.testing.assert_array_equal(skip([x, 2 * x]), x)
    kept = blocks.SkippableAdd(architecture.dimension("s", ["skip", "keep"], [0, 1]))
    np.testing.assert_array_equal(kept([x, 2 * x]), x + 2 * x)


@pytest.mark.parametrize("quantized", [False, True])
def test_largest_choices_compute_exactly_the_plain_mobilenet_v2(quantized):
    # The whole MobileNetV2 in float; its first three stages quantized (the applying calibrates every kernel).
    shape = dict(input_shape=(16, 16, 3), classes=10, width=0.5, small_input=True)
    if quantized:
        shape["stages"] = STAGES
    space = models.searchable_mobilenet_v2(**shape)
    plain = models.mobilenet_v2(**shape, kernel_size=7)
    by_name = {layer.name: layer for layer in plain.layers}
    for layer in space.layers:
        if layer.weights:
            by_name[layer.name].set_weights(layer.get_weights())
    # Layer for layer: the masks are all the searchable network adds.
    assert set(by_name) == {layer.name for layer in space.layers if not isinstance(layer, blocks.ChannelMask)}
    if quantized:
        space, plain = fliqs_keras.apply(space, "int4"), fliqs_keras.apply(plain, "int4")
    x = np.random.RandomState(1).rand(4, 16, 16, 3).astype("float32")
    np.testing.assert_array_equal(space(x, training=False), plain(x, training=False))


def _exported(digits, train: bool):
    """The tiny space at a drawn architecture with a skipped block, kernel 5, expand3 and width 0.5, and its export."""
    keras.utils.set_random_seed(0)
    model = fliqs_keras.apply(models.searchable_mobilenet_v2(**TINY), ["int4", "int8"])
    model.compile(keras.optimizers.Adam(1e-3), _loss())
    choices = _random_choices(model, 7)
    choices.update({"block2/skip": "skip", "block1/kernel": "kernel5", "block1/expansion": "expand3",
                    "stage1/width": "width0.5"})
    fliqs_keras.set_formats(model, choices)
    (x, y), _ = digits
    if train:
        model.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0)  # trains the choices and their input clips
    return model, chosen_architecture(model), x[:256]


def test_exported_architecture_has_the_chosen_shapes_its_cost_and_the_searchable_outputs(digits):
    model, plain, x = _exported(digits, train=False)
    assert not fliqs_keras.search_model.architecture_layers(plain)
    names = {layer.name for layer in plain.layers}
    assert "block2_expand" not in names and "block2_add" not in names  # the skipped block left nothing behind
    assert plain.get_layer("block1_depthwise").layer.kernel.shape == (5, 5, 24, 1)  # expand3 of 8 inputs
    assert plain.get_layer("block1_expand").layer.kernel.shape == (1, 1, 8, 24)
    assert plain.get_layer("block1_project").layer.kernel.shape == (1, 1, 24, 8)  # width0.5 of 16
    assert plain.get_layer("block3_expand").layer.kernel.shape[2] == 8  # reads the narrowed stage

    chosen = fliqs_keras.chosen_formats(model)
    for metric in ("bops", "size"):
        searched, exported = cost.CostModel(model, metric), cost.CostModel(plain, metric)
        want = exported.cost(fliqs_keras.chosen_formats(plain))
        assert searched.cost(chosen) == want
        indices = np.array([fliqs_keras.decisions(model)[n].index(architecture.choice(chosen[n]))
                            for n in model.decision_names], np.int32)
        assert float(searched.graph_cost(indices, model.decision_names)) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(plain(x, training=False), model(x, training=False), atol=1e-4)


@pytest.mark.slow  # training, then a TFLite export and its verification: 30 s
def test_exported_architecture_in_tflite_agrees_with_the_searchable_model(digits, tmp_path):
    model, plain, x = _exported(digits, train=True)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(plain(x, training=False), want, atol=1e-4)
    verification = fliqs_keras.export.to_tflite(plain, tmp_path / "chosen.tflite", x, verify_samples=len(x))
    from ai_edge_litert import interpreter

    runner = interpreter.Interpreter(model_path=str(tmp_path / "chosen.tflite")).get_signature_runner()
    input_name, output_name = next(iter(runner.get_input_details())), next(iter(runner.get_output_details()))
    got = np.concatenate([runner(**{input_name: row[None]})[output_name] for row in x])
    agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert agreement >= 0.97 and verification.argmax_agreement >= 0.97, (agreement, verification)
    record = fliqs_keras.export.build_formats_file(plain)
    assert set(record["decisions"]) == set(fliqs_keras.decisions(plain))


def test_one_masked_path_whatever_the_number_of_choices():
    """The traced model holds the same convolutions, and no branch, with one choice or all of them."""
    def traced_ops(**choices):
        model = fliqs_keras.apply(models.searchable_mobilenet_v2(**TINY, **choices), ["int4", "int8"])
        graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(
            tf.TensorSpec((2, 8, 8, 1))).graph
        kinds = [op.type for op in graph.get_operations()]
        return {kind: kinds.count(kind) for kind in ("Conv2D", "DepthwiseConv2dNative")}, kinds

    one, _ = traced_ops(kernel_sizes=(7,), expansions=(6,), widths=(1.0,), skip=False)
    every, kinds = traced_ops()
    assert one == every and one["DepthwiseConv2dNative"] == 5, (one, every)
    assert not {"If", "StatelessIf", "Case", "StatelessCase", "While"} & set(kinds)


@pytest.mark.slow  # a search of 40 steps, traced with every decision: 40 s
def test_joint_search_draws_architecture_and_formats_in_one_step_and_saves(digits, tmp_path):
    keras.utils.set_random_seed(0)
    model = fliqs_keras.apply(models.searchable_mobilenet_v2(**TINY), {"*": ["int4", "int8"], "logits": "int8"})
    model.compile(keras.optimizers.Adam(1e-3), _loss(), steps_per_execution=2)
    report = str(fliqs_keras.report(model))
    assert "architecture" in report and "block2/skip" in report
    (x, y), (x_test, y_test) = digits
    search = fliqs_keras.FliqsSearch(target="int8*0.5", validation_data=(x[:128], y[:128]), warmup=0.25,
                                     learning_rate=0.1, max_cost_ratio=1.0)
    seen = []
    rows = [i for i, n in enumerate(model.decision_names) if "/" in n]

    class Seen(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(tuple(self.model.format_state.current_indices()[rows]))

    model.fit(x[128:768], y[128:768], batch_size=32, epochs=2, verbose=0, callbacks=[search, Seen()])
    kinds = {n: architecture.is_architecture(f) for n, f in fliqs_keras.chosen_formats(model).items()}
    assert sum(kinds.values()) == len(rows) == ARCHITECTURE_DECISIONS and not all(kinds.values())
    # The compiled step drew the architecture: its choices changed from execution to execution.
    assert len(set(seen)) > 1
    assert int(model.controller.updates.numpy()) > 0
    costs = cost.CostModel(model)
    assert search.final_cost_ratio <= 1.0 + 1e-6
    assert costs.cost(fliqs_keras.chosen_formats(model)) == pytest.approx(search.final_cost_ratio * search.target)
    assert cost.bops(model) == costs.cost(fliqs_keras.chosen_formats(model))
    assert f"{cost.bops(model) / 1e9:.4f}" in cost.summary(model).splitlines()[-1]
    # The search's figure draws the format decisions, their costs scaled by the chosen architecture.
    assert plots.search_figure(search.history, fliqs_keras.chosen_formats(model), search.costs,
                               tmp_path / "search.png", target=search.target).exists()
    model.save(tmp_path / "joint.keras")
    loaded = keras.models.load_model(tmp_path / "joint.keras")
    assert fliqs_keras.chosen_formats(loaded) == fliqs_keras.chosen_formats(model)
    np.testing.assert_array_equal(loaded.predict(x_test[:32], verbose=0), model.predict(x_test[:32], verbose=0))


def test_bad_input_is_named(digits, tmp_path):
    model = fliqs_keras.apply(models.searchable_mobilenet_v2(**TINY), ["int4", "int8"])
    with pytest.raises(ValueError, match=r"needs a plain architecture.*chosen_architecture"):
        fliqs_keras.export.fixed_model(model)
    with pytest.raises(ValueError, match=r"needs a plain architecture"):
        fliqs_keras.export.build_formats_file(model)
    with pytest.raises(ValueError, match="keys a layer by its format only"):
        cost.CostModel(model, "table", table={})
    with pytest.raises(ValueError, match="has no architecture decisions"):
        chosen_architecture(fliqs_keras.apply(models.mobilenet_v2(**{k: v for k, v in TINY.items()}), "int8"))
    with pytest.raises(ValueError, match="cannot be skipped"):
        blocks.inverted_residual(keras.Input((8, 8, 8)), "b", output_channels=16, skippable=True)
    with pytest.raises(ValueError, match="widths must include 1.0"):
        models.searchable_mobilenet_v2(**TINY, widths=(0.5, 0.75))
    with pytest.raises(ValueError, match="not among its choices"):
        fliqs_keras.set_formats(model, {"block1/kernel": "kernel9"})
    with pytest.raises(ValueError, match=r"No format given for decisions \['block1/kernel'\]"):
        choices = fliqs_keras.chosen_formats(model)
        del choices["block1/kernel"]
        cost.CostModel(model).cost(choices)


@pytest.mark.slow  # two searches, each in a process of its own: 4.5 minutes
@pytest.mark.parametrize("backend", ["jax", "mirrored"])
def test_joint_search_on_jax_and_under_mirrored_strategy(backend, tmp_path):
    script = ROOT / "tests" / "architecture_backends.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax" if backend == "jax" else "tensorflow"}
    result = subprocess.run([sys.executable, str(script), backend, str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / f"{backend}.json").read_text())
    assert report["updates"] > 0 and report["loss_finite"], report
    assert report["architecture_decisions"] == ARCHITECTURE_DECISIONS, report
    assert report["distinct_draws"] > 1, report
    assert report["export_max_difference"] < 1e-4, report
