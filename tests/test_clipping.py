"""Switchable clipping: calibrators and running statistics."""

import numpy as np
import pytest
import tensorflow as tf

from fliqs_keras import clipping, quantizers


def _gaussian_with_outliers(seed=0, size=20_000, outliers=20):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size).astype(np.float32)
    x[rng.choice(size, outliers, replace=False)] *= 25.0
    return x


def _quant_error(x, fmt, clip):
    return float(np.mean((quantizers.fake_quant(x, fmt, clip=clip).numpy() - x) ** 2))


def test_mse_clip_beats_max_clip_for_int4_on_gaussian_with_outliers():
    x = _gaussian_with_outliers()
    mse_clip = float(clipping.calibrate(x, "int4", "mse"))
    max_clip = float(clipping.calibrate(x, "int4", "max"))
    assert mse_clip < 0.5 * max_clip
    assert _quant_error(x, "int4", mse_clip) < 0.7 * _quant_error(x, "int4", max_clip)


def test_the_calibrator_picks_different_clips_for_int4_and_e5m2():
    x = _gaussian_with_outliers()
    table = clipping.calibrate_formats(x, ["int4", "e5m2"]).numpy()
    assert table.shape == (2,)
    assert table[0] < 0.5 * table[1]
    # E5M2 has the dynamic range to keep the outliers: max clipping is its optimum here.
    assert table[1] == pytest.approx(np.abs(x).max())


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8", "e4m3", "e2m1", "e3m2"])
def test_mse_is_never_worse_than_max_and_is_the_best_candidate(fmt):
    x = np.random.default_rng(1).laplace(size=5000).astype(np.float32)
    fractions = np.linspace(0.2, 1.0, 9)
    best = float(clipping.mse_fraction(x, fmt, fractions=fractions))
    peak = np.abs(x).max()
    errors = [_quant_error(x, fmt, f * peak) for f in fractions]
    assert _quant_error(x, fmt, best * peak) == pytest.approx(min(errors), rel=1e-6)
    assert min(errors) <= errors[-1]


def test_per_channel_calibration_equals_calibrating_each_channel_alone():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 3, 8, 6)).astype(np.float32) * np.array([0.1, 1, 3, 10, 0.5, 2], np.float32)
    w[0, 0, 0, 3] = 200.0
    for method in ["max", "percentile", "mse"]:
        per_channel = clipping.calibrate(w, "int4", method, axis=-1).numpy()
        assert per_channel.shape == (6,)
        for c in range(6):
            alone = float(clipping.calibrate(w[..., c], "int4", method))
            assert per_channel[c] == pytest.approx(alone, rel=1e-5), (method, c)
    table = clipping.calibrate_formats(w, ["int4", "int8", "e4m3"], axis=-1)
    assert tuple(table.shape) == (3, 6)


def test_max_and_percentile_match_numpy():
    x = np.random.default_rng(3).normal(size=(100, 7)).astype(np.float32)
    np.testing.assert_allclose(clipping.max_abs(x, axis=1).numpy(), np.abs(x).max(axis=0))
    np.testing.assert_allclose(
        clipping.percentile(x, axis=1, q=90.0).numpy(), np.percentile(np.abs(x), 90.0, axis=0), rtol=1e-5
    )
    assert float(clipping.percentile(x)) == pytest.approx(np.percentile(np.abs(x), 99.99), rel=1e-5)


def test_bad_calibration_arguments():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="Unknown clip calibrator 'mean'"):
        clipping.calibrate(x, "int8", "mean")
    with pytest.raises(ValueError, match="fractions"):
        clipping.mse_fraction(x, "int8", fractions=[0.5, -1.0])
    with pytest.raises(ValueError, match="fractions"):
        clipping.mse_fraction(x, "int8", fractions=[])
    with pytest.raises(ValueError, match=r"percentile q must be in \(0, 100\], got 0"):
        clipping.percentile(x, q=0)
    with pytest.raises(ValueError, match="out of range"):
        clipping.max_abs(x, axis=3)
    with pytest.raises(ValueError, match="at least one format"):
        clipping.calibrate_formats(x, [])
    with pytest.raises(ValueError, match="Unknown number format 'int4b'"):
        clipping.calibrate(x, "int4b")


def test_all_zero_tensor_calibrates_to_zero_and_quantizes_to_zeros():
    x = np.zeros((4, 4), np.float32)
    clip = clipping.calibrate(x, "int4")
    assert float(clip) == 0.0
    np.testing.assert_array_equal(quantizers.fake_quant(x, "int4", clip=clip).numpy(), x)


def _running_table(rows=3, channels=2):
    return tf.Variable(np.zeros((rows, channels), np.float32)), tf.Variable(np.zeros(rows, np.int32))


def test_running_clip_starts_from_the_first_observation_then_averages_one_row():
    table, counts = _running_table()
    clipping.update_running(table, counts, tf.constant(1), tf.constant([2.0, 4.0]), momentum=0.75)
    np.testing.assert_array_equal(table.numpy(), [[0, 0], [2, 4], [0, 0]])
    clipping.update_running(table, counts, tf.constant(1), tf.constant([6.0, 8.0]), momentum=0.75)
    np.testing.assert_allclose(table.numpy(), [[0, 0], [3, 5], [0, 0]])
    clipping.update_running(table, counts, tf.constant(2), tf.constant([1.0, 1.0]), momentum=0.75)
    np.testing.assert_allclose(table.numpy(), [[0, 0], [3, 5], [1, 1]])
    np.testing.assert_array_equal(counts.numpy(), [0, 2, 1])


def test_running_clip_ignores_non_finite_observations():
    table, counts = _running_table()
    clipping.update_running(table, counts, tf.constant(0), tf.constant([1.0, 1.0]))
    clipping.update_running(table, counts, tf.constant(0), tf.constant([np.nan, 3.0]))
    np.testing.assert_array_equal(table.numpy()[0], [1.0, 1.0])
    np.testing.assert_array_equal(counts.numpy(), [1, 0, 0])


def test_running_clip_inside_a_compiled_step_with_a_sampled_format():
    table, counts = _running_table(rows=2, channels=1)
    grids = quantizers.grid_table(["int4", "e5m2"])

    @tf.function(jit_compile=True)
    def step(x, index):
        clipping.update_running(table, counts, index, clipping.mse(x, tf.gather(grids, index))[None], 0.5)

    x = tf.constant(_gaussian_with_outliers(size=4000, outliers=8))
    for index in [0, 1, 0]:
        step(x, tf.constant(index))
    assert step.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(table.numpy()[:, 0], [clipping.mse(x, "int4"), clipping.mse(x, "e5m2")], rtol=1e-6)
    np.testing.assert_array_equal(counts.numpy(), [2, 1])


def test_bad_momentum():
    table, counts = _running_table()
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\), got 1.0"):
        clipping.update_running(table, counts, 0, tf.ones(2), momentum=1.0)
