"""Reference models: the paper's BOPs at 224x224 in BF16, and each one through apply and a search step."""

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import models


@pytest.mark.parametrize("build, gbops, tolerance", [
    (lambda: models.resnet18(), 467.7, 0.02),
    (lambda: models.resnet50(), 1047.0, 0.02),  # the stride in the 3x3 convolution, as the paper counts
    (lambda: models.mobilenet_v2(), 77.0, 0.01),
])
def test_bf16_bops_at_224_match_the_paper(build, gbops, tolerance):
    searchable = fliqs_keras.apply(build(), "bf16")
    assert fliqs_keras.cost.bops(searchable) / 1e9 == pytest.approx(gbops, rel=tolerance)


def test_resnet50_with_the_stride_in_the_1x1_matches_keras_applications():
    ours = fliqs_keras.cost.CostModel(fliqs_keras.apply(models.resnet50(stride_in_1x1=True), "bf16"))
    # 3.858 GMACs: the figure of keras.applications.ResNet50 (checked in test_cost).
    assert ours.uniform("bf16") / 256 / 1e9 == pytest.approx(3.858, rel=0.01)


SMALL = {
    "resnet18": lambda: models.resnet18((32, 32, 3), classes=10, stem="cifar", width=0.25),
    "resnet50": lambda: models.resnet50((32, 32, 3), classes=10, stem="cifar", width=0.125),
    "resnet18_imagenet_stem": lambda: models.resnet18((64, 64, 3), classes=10, width=0.25),
    "mobilenet_v2": lambda: models.mobilenet_v2((28, 28, 1), classes=10, width=0.35, small_input=True),
    "vit": lambda: models.vit((32, 32, 3), classes=10, patch=8, width=32, depth=2, heads=2),
    "digits_resnet_8x8": lambda: models.digits_resnet((8, 8, 1)),
    "small_cnn": lambda: models.small_cnn(),
    "small_cnn_8x8": lambda: models.small_cnn((8, 8, 1)),  # the second pool has no room: left out
}


@pytest.mark.parametrize("name", [
    # The ImageNet-scale models take 20 s to a minute each to trace and compile here; digits_resnet keeps
    # the residual blocks in the default run.
    pytest.param(name, marks=pytest.mark.slow) if name in ("resnet18", "resnet18_imagenet_stem", "resnet50",
                                                           "mobilenet_v2") else name
    for name in sorted(SMALL)])
def test_model_builds_runs_and_takes_a_search_step(name):
    keras.utils.set_random_seed(0)
    model = SMALL[name]()
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(0).normal(size=(16,) + shape).astype(np.float32)
    y = np.arange(16) % 10
    assert model(x[:2]).shape == (2, 10)
    float_output = keras.ops.convert_to_numpy(model(x[:4]))
    searchable = fliqs_keras.apply(model, ["int4", "int8", "e4m3"])
    # The quantization is really applied: INT4 moves the output, and every supported layer is wrapped.
    fliqs_keras.set_formats(searchable, "int4")
    assert np.abs(keras.ops.convert_to_numpy(searchable(x[:4])) - float_output).max() > 1e-3 * np.abs(
        float_output).max()
    searchable.compile(keras.optimizers.Adam(1e-3),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [keras.ops.convert_to_numpy(v).copy() for v in searchable.trainable_variables]
    logits_before = searchable.controller.logits.numpy().copy()
    search = fliqs_keras.FliqsSearch(target="int8*0.75", quality="loss", warmup=0.0)
    history = searchable.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[search])
    assert np.isfinite(history.history["loss"][-1]) and np.isfinite(history.history["reward"][-1])
    # Both steps trained the weights and updated the policy; the logged cost is that of a drawn policy.
    after = [keras.ops.convert_to_numpy(v) for v in searchable.trainable_variables]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after) if b.ndim > 1)
    assert int(searchable.controller.updates.numpy()) == 2
    assert not np.array_equal(searchable.controller.logits.numpy(), logits_before)
    costs = fliqs_keras.cost.CostModel(searchable)
    low, high = costs.bounds()
    target = costs.target("int8*0.75")
    assert low / target - 1e-6 <= history.history["cost_ratio"][-1] <= high / target + 1e-6
    assert set(fliqs_keras.chosen_formats(searchable)) == set(fliqs_keras.decisions(searchable))


def test_vit_saves_and_loads(tmp_path):
    model = models.vit((16, 16, 3), classes=4, patch=4, width=16, depth=1, heads=2)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    model.save(tmp_path / "vit.keras")
    loaded = keras.saving.load_model(tmp_path / "vit.keras")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stem"):
        models.resnet18(stem="tiny")
    with pytest.raises(ValueError, match="width"):
        models.mobilenet_v2(width=0)
    with pytest.raises(ValueError, match="patch size"):
        models.vit((30, 30, 3), patch=8)


def test_digits_resnet_spreads_its_cost_unevenly():
    """The Pareto benchmark's model: the 3x3 block convolutions carry the MACs, the rest is cheap."""
    costs = fliqs_keras.cost.layer_costs(fliqs_keras.apply(models.digits_resnet(), "int8"))
    macs = {entry.path: entry.macs for entry in costs}
    assert sum(macs.values()) == 3_246_240
    heavy = sum(v for k, v in macs.items() if k.endswith(("_1_conv", "_2_conv")))
    assert heavy / sum(macs.values()) > 0.9
    assert macs["stem_conv"] < 0.03 * sum(macs.values()) and macs["logits"] == 480
    with pytest.raises(ValueError, match="width must be > 0"):
        models.digits_resnet(width=0)


def test_digits_mobilenet_puts_a_sixth_of_its_cost_in_cheap_sensitive_layers():
    """The second Pareto model: expansions and projections carry the MACs; the stem and the depthwise
    convolutions, each far cheaper, share about a sixth of them."""
    model = models.digits_mobilenet()
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
    costs = fliqs_keras.cost.layer_costs(fliqs_keras.apply(model, "int8"))
    macs = {entry.path: entry.macs for entry in costs}
    assert len(macs) == 16 and sum(macs.values()) == 2_567_456
    cheap = sum(v for k, v in macs.items() if k.endswith("_depthwise") or k == "stem_conv")
    assert 0.15 < cheap / sum(macs.values()) < 0.17
    assert max(v for k, v in macs.items() if k.endswith("_depthwise")) < 0.05 * sum(macs.values())
    with pytest.raises(ValueError, match="width must be > 0"):
        models.digits_mobilenet(width=0)
