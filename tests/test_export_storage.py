"""What the TFLite file stores: FLOAT16 codes for FP formats, integer attention weights, compact metadata."""

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import data, export, formats, models
from fliqs_keras.export import float16

FLOAT16_FORMATS = ["e5m2", "e4m3", "e4m3_ieee", "e3m4", "e2m5", "e2m3", "e3m2", "e2m1", "fp16"]
_FLOAT16, _FLOAT32, _INT8 = 1, 0, 9


def _all_codes(fmt: formats.FloatFormat) -> np.ndarray:
    """Every finite value of `fmt`: from ml_dtypes' bit patterns where it has the type, else from the definition."""
    if fmt.ml_dtype is not None:
        bits = np.arange(2 ** (8 * fmt.ml_dtype.itemsize), dtype=np.uint32)
        raw = bits.astype({1: np.uint8, 2: np.uint16}[fmt.ml_dtype.itemsize])
        values = raw.view(fmt.ml_dtype).astype(np.float32)
        return values[np.isfinite(values)]
    assert fmt.flavour == "finite"
    mantissas = np.arange(2**fmt.mantissa_bits) / 2**fmt.mantissa_bits
    normal = [(1 + mantissas) * 2.0 ** (e - fmt.bias) for e in range(1, 2**fmt.exponent_bits)]
    subnormal = mantissas * 2.0 ** (1 - fmt.bias)
    positive = np.concatenate([subnormal] + normal)
    return np.concatenate([positive, -positive]).astype(np.float32)


@pytest.mark.parametrize("name", FLOAT16_FORMATS + ["bf16"])
def test_float16_holds_every_code_of_the_fp_formats_and_not_bf16(name):
    fmt = formats.get(name)
    codes = _all_codes(fmt)
    assert codes.size > 0 and np.abs(codes).max() == np.float32(fmt.max_value)
    with np.errstate(over="ignore"):
        exact = codes.astype(np.float16).astype(np.float32).view(np.int32) == codes.view(np.int32)
    if name == "bf16":
        assert not exact.all() and "65504" in float16.unfit_reason(fmt)
    else:
        assert exact.all(), codes[~exact][:5]  # subnormals and signed zeros included
        assert float16.unfit_reason(fmt) is None


def test_split_gives_codes_that_rebuild_the_values_bit_for_bit_or_says_why_not():
    rng = np.random.default_rng(0)
    fmt = formats.get("e4m3")
    codes = rng.choice(_all_codes(fmt), size=(6, 3, 3, 2)).astype(np.float32)
    scale = rng.uniform(1e-3, 1.0, size=6).astype(np.float32)
    values = (codes * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    halves, reason = float16.split(values, fmt, scale, 0)
    assert reason is None and halves.dtype == np.float16
    assert np.array_equal(halves.astype(np.float32).view(np.int32), codes.view(np.int32))
    bent = values.copy()
    bent[0, 0, 0, 0] = np.nextafter(bent[0, 0, 0, 0], np.float32(np.inf))
    assert float16.split(bent, fmt, scale, 0)[1] == "1 of its values are not a float16 code times the channel's scale"


def _tensors(path):
    from ai_edge_litert.tools import flatbuffer_utils

    model_t = flatbuffer_utils.read_model_from_bytearray(path.read_bytes())
    return model_t, {t.name.decode(): t for t in model_t.subgraphs[0].tensors}


def _array(model_t, tensor, dtype):
    return np.asarray(model_t.buffers[tensor.buffer].data, np.uint8).view(dtype).reshape(tensor.shape)


@pytest.fixture(scope="module")
def fp_cnn():
    """A small CNN on the 8x8 digits trained while every layer switches among all FP formats and bf16."""
    (x, y), (x_test, _) = data.sklearn_digits()
    keras.utils.set_random_seed(0)
    choices = FLOAT16_FORMATS + ["bf16"]
    searchable = fliqs_keras.apply(models.small_cnn(x.shape[1:], 10), choices)
    rng = np.random.default_rng(0)

    class Switch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            fliqs_keras.set_formats(searchable, {n: choices[rng.integers(len(choices))]
                                                 for n in ("conv1", "conv2", "logits")})

    searchable.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    searchable.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[Switch()])
    return searchable, x_test


@pytest.mark.parametrize("chosen", [("e5m2", "e4m3", "e3m4"), ("e2m5", "e2m3", "e3m2"), ("e2m1", "fp16", "bf16")])
def test_fp_weights_are_float16_codes_that_give_back_the_trained_values_bit_for_bit(fp_cnn, chosen, tmp_path):
    searchable, x_test = fp_cnn
    layers = dict(zip(("conv1", "conv2", "logits"), chosen))
    fliqs_keras.set_formats(searchable, layers)
    path = tmp_path / "model.tflite"
    result = export.to_tflite(searchable, path, x_test, min_agreement=0.0)
    assert export.verify_annotations(path).ok
    _, kernels = export.float_model(searchable)
    model_t, tensors = _tensors(path)
    plans = {p.layer: p for p in result.layers}
    for layer, name in layers.items():
        tensor = tensors[f"fliqs/{layer}/kernel"]
        trained = kernels[layer].values
        trained = trained.T if layer == "logits" else np.transpose(trained, (3, 0, 1, 2))
        if name == "bf16":
            assert tensor.type == _FLOAT32 and not plans[layer].float16
            assert "float32, not float16: bf16 reaches" in "; ".join(plans[layer].notes)
            assert np.array_equal(_array(model_t, tensor, np.float32).view(np.int32), trained.view(np.int32))
            continue
        assert tensor.type == _FLOAT16 and plans[layer].float16, plans[layer]
        codes = _array(model_t, tensor, np.float16).astype(np.float32)
        if formats.get(name).ml_dtype is not None:  # the codes are the format's numbers (ml_dtypes' cast)
            assert np.array_equal(codes.astype(formats.get(name).ml_dtype).astype(np.float32), codes)
        scale = _array(model_t, tensors[f"fliqs/{layer}/kernel/scale"], np.float32)
        rebuilt = (codes * scale.reshape((-1,) + (1,) * (codes.ndim - 1))).astype(np.float32)
        assert np.array_equal(rebuilt.view(np.int32), trained.view(np.int32)), layer


@pytest.fixture(scope="module")
def vit_int8():
    """A one-block ViT on the 8x8 digits, trained in float, then in INT8 everywhere (attention included)."""
    (x, y), (x_test, y_test) = data.sklearn_digits()
    keras.utils.set_random_seed(0)
    model = models.vit(input_shape=(8, 8, 1), classes=10, patch=2, width=32, depth=1, heads=2, mlp_ratio=2)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(2e-3), loss)
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    searchable = fliqs_keras.apply(model, ["int8"])
    searchable.compile(keras.optimizers.Adam(5e-4), loss)
    searchable.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return searchable, np.concatenate([x_test, x])


@pytest.mark.slow  # a ViT trained, then exported with its attention in INT8 (28 s)
def test_vit_with_int8_attention_stores_int8_projections_and_agrees(vit_int8, tmp_path):
    searchable, inputs = vit_int8
    path = tmp_path / "vit.tflite"
    result = export.to_tflite(searchable, path, inputs, verify_samples=600, min_agreement=0.97)
    assert result.samples == 600 and result.argmax_agreement >= 0.97, str(result)
    model_t, tensors = _tensors(path)
    for projection in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
        tensor = tensors[f"fliqs/block0_attention/{projection}/kernel"]
        assert tensor.type == _INT8 and tensor.quantization.scale is not None, projection
    plan = next(p for p in result.layers if p.layer == "block0_attention")
    assert (plan.weight_bits, plan.dynamic, plan.tflite) == (8, True, "weights int8, inputs int8 per invoke")
    assert "scores, softmax and the weighted sum run in float" in "; ".join(plan.notes)
    assert "1 integer weights with inputs quantized per invoke" in result.summary()
    assert not any(t.type == _FLOAT32 and model_t.buffers[t.buffer].data is not None and len(t.shape) == 2
                   and min(t.shape) >= 32 for t in tensors.values()), "a float32 weight matrix is left"


@pytest.mark.slow
def test_metadata_is_small_and_the_file_alone_gives_back_formats_and_annotations(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.mobilenet_v2(input_shape=(32, 32, 3), classes=10, width=0.5)
    x = np.random.default_rng(0).uniform(-1, 1, size=(64, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, size=64)
    searchable = fliqs_keras.apply(model, ["int8", "e4m3"])
    searchable.compile(keras.optimizers.SGD(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for name in ("int8", "e4m3"):
        fliqs_keras.set_formats(searchable, name)
        searchable.fit(x, y, epochs=1, batch_size=32, verbose=0)
    for name in ("int8", "e4m3"):
        fliqs_keras.set_formats(searchable, name)
        path = tmp_path / f"{name}.tflite"
        export.to_tflite(searchable, path, x, verify_samples=16, min_agreement=0.0)
        model_t, tensors = _tensors(path)
        metadata = sum(np.asarray(model_t.buffers[m.buffer].data).size for m in model_t.metadata
                       if m.name.decode().startswith("fliqs_"))
        assert metadata <= 0.02 * path.stat().st_size, (name, metadata, path.stat().st_size)

        loaded = export.load_formats_file(path)
        written = export.build_formats_file(searchable)
        assert loaded["decisions"] == written["decisions"] and set(loaded["layers"]) == set(written["layers"])
        export.check_matches(loaded, searchable)
        for layer, entry in loaded["layers"].items():
            for weight, held in entry["weight_scales"].items():
                assert isinstance(held, str) and held in tensors, (layer, weight, held)
        check = export.verify_annotations(path)
        assert check.ok and len(check.checked) == (len(loaded["layers"]) if name == "e4m3" else 0), check


def test_a_tflite_file_without_the_formats_metadata_is_named(tmp_path):
    from fliqs_keras.export import tflite

    plain = tmp_path / "plain.tflite"
    inputs = keras.Input((4,))
    plain.write_bytes(tflite.convert(keras.Model(inputs, keras.layers.Dense(2)(inputs))))
    with pytest.raises(ValueError, match="plain.tflite is a TFLite file without a readable 'fliqs_formats'"):
        export.load_formats_file(plain)
