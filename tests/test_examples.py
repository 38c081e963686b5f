"""The example scripts run end to end on the offline data."""

import functools
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import fliqs_keras

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quantize_digits_runs_and_reports_every_format(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quantize_digits.py"), "--epochs=2",
         "--formats=fp32,int8,e4m3,int2", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "acc mse-clip" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["format"]: row for row in results["formats"]}
    assert list(rows) == ["fp32", "int8", "e4m3", "int2"]
    assert results["float_accuracy"] > 0.8
    assert rows["fp32"]["accuracy_mse_clip"] == results["float_accuracy"]
    assert abs(rows["int8"]["accuracy_mse_clip"] - results["float_accuracy"]) <= 0.01
    # INT2 with max clipping (one level per sign) must lose more than INT8 does.
    assert rows["int2"]["accuracy_max_clip"] < rows["int8"]["accuracy_max_clip"]
    assert (tmp_path / "float_model.keras").stat().st_size > 0


def _search(tmp_path, *flags, epochs=1, examples=384):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "search.py"), f"--epochs={epochs}",
         f"--max_train_examples={examples}", "--batch_size=32", f"--output_dir={tmp_path}", *flags],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow  # the main job in a process of its own: a search, two references, the export (100 s)
def test_search_script_runs_end_to_end_and_writes_everything(tmp_path):
    # Enough training for a model whose argmaxes are not near-ties (72% test accuracy, 0.976 agreement here).
    result = _search(tmp_path, "--search_space=int4,int8,e4m3", "--target=int8*0.5", epochs=3, examples=1024)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("formats.json", "searched.keras", "fixed.keras", "model.tflite", "search.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
    results = json.loads((tmp_path / "results.json").read_text())
    policy = json.loads((tmp_path / "formats.json").read_text())
    assert set(results["formats"]) == set(policy["decisions"]) and len(results["formats"]) == 8
    assert set(results["formats"].values()) <= {"int4", "int8", "e4m3"}
    assert results["target_cost"] == results["uniform_int8_cost"] * 0.5
    assert results["test_accuracy"] > 0.5 and results["replicas"] == 1
    assert results["bn_reestimation_examples"] == 4096 and 0.0 < results["test_accuracy_before_bn_reestimation"] <= 1
    assert results["tflite_verified"] and results["tflite_argmax_agreement"] >= 0.95, results
    assert results["policy_learning_rate"] == fliqs_keras.search_config.policy_learning_rate(72)  # 96 steps, 24 warm
    assert set(results["policy_entropy_nats"]) == set(results["formats"])
    assert all(0 < h <= math.log(3) + 1e-6 for h in results["unsettled_decisions_nats"].values())
    # The references within the budget (uniform INT4 costs 0.25 of INT8; INT8 and E4M3 do not fit) and float.
    assert list(results["references"]) == ["float", "int4"], results["references"]
    assert results["references"]["int4"]["cost"] == results["uniform_int8_cost"] * 0.25
    assert all(0 < r["test_accuracy"] <= 1 for r in results["references"].values())
    assert "uniform int4" in results["verdict"] and "float" in results["verdict"]
    # The per-layer table, the cost/accuracy table with its references, the verdict and one export summary.
    for line in ("stage2_block1_2_conv", "float (trained here)", "uniform int4 (trained here)", "searched formats",
                 f"verdict: {results['verdict']}"):
        assert line in result.stdout, line
    assert result.stdout.count("argmax agreement") == 1
    # Nothing of TensorFlow's or LiteRT's own output.
    for noise in ("XNNPACK", "Running Calibration", "experimental_preserve_all_tensors", "Assets written",
                  "saved_model", "fingerprint"):
        assert noise not in result.stdout + result.stderr, noise


@pytest.mark.slow
def test_search_script_searches_for_latency_with_a_table_it_measures_once(tmp_path):
    # Uniform INT8 is one of the space's own policies, so its measured latency is always a reachable target; a
    # factor over it is not, when INT8 happens to time as the dearest format.
    result = _search(tmp_path, "--cost=latency", "--model=small_cnn", "--search_space=int4,int8,e4m3",
                     "--target=int8", "--references=float", "--noexport_tflite")
    assert result.returncode == 0, result.stderr[-3000:]
    tables = list(tmp_path.glob("latency_table_*.json"))
    assert len(tables) == 1
    table = fliqs_keras.cost_tables.load(tables[0])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cost_metric"] == "latency" and set(table.layers) >= {"conv1", "logits"}, table.layers
    assert results["target_cost"] == pytest.approx(results["uniform_int8_cost"])
    assert "Measured the latency table" in result.stdout and "XNNPACK" not in result.stdout + result.stderr
    # A second run on the same model and threads reads the table instead of measuring it.
    again = _search(tmp_path, "--cost=latency", "--model=small_cnn", "--search_space=int4,int8,e4m3",
                    "--target=int8", "--references=float", "--noexport_tflite")
    assert again.returncode == 0 and list(tmp_path.glob("latency_table_*.json")) == tables
    assert "Using the latency table measured before" in again.stdout


@pytest.mark.slow
def test_search_script_runs_mirrored_on_two_logical_cpus(tmp_path):
    # With the exact cost credit (its batch of alternative policies is costed in every replica's step)
    # and the high-first warm-up (its mask of the choices allowed is built in every replica's step).
    result = _search(tmp_path, "--strategy=mirrored", "--logical_cpus=2", "--noexport_tflite",
                     "--model=small_cnn", "--search_space=int2,int4,int8", "--cost_credit=exact",
                     "--warmup_draws=high_first")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["replicas"] == 2 and set(results["formats"]) == {"conv1", "conv2", "logits"}
    # No batch norm to re-estimate: the accuracy is the model's as trained.
    assert results["test_accuracy"] == results["test_accuracy_before_bn_reestimation"]
    assert (tmp_path / "formats.json").exists() and not (tmp_path / "model.tflite").exists()


def test_search_script_refuses_multi_worker_and_unknown_strategies(tmp_path):
    result = _search(tmp_path, "--strategy=multi_worker_mirrored")
    assert result.returncode != 0
    assert "MultiWorkerMirroredStrategy is not offered" in result.stderr and "default, mirrored, tpu" in result.stderr
    result = _search(tmp_path, "--strategy=horovod")
    assert result.returncode != 0 and "Unknown --strategy='horovod'" in result.stderr
    result = _search(tmp_path, "--dataset=cifar10")
    assert result.returncode != 0 and "--data_dir" in result.stderr


@pytest.mark.slow  # five runs of the script, each in a process of its own (12 s)
def test_search_script_refuses_nothing_to_train_and_an_output_under_a_file(tmp_path):
    for flag in ("--epochs=0", "--epochs=-3", "--batch_size=0"):
        result = _search(tmp_path, flag)  # after the helper's own flags: the last one counts
        name, value = flag[2:].split("=")
        assert result.returncode != 0 and f"--{name}={value}" in result.stderr, result.stderr[-2000:]
    # A format typo in --references stops the run before any training, not after the search.
    result = _search(tmp_path / "refs", "--references=float,int9x")
    assert result.returncode != 0 and "--references" in result.stderr and "int9x" in result.stderr
    assert "Epoch 1/" not in result.stdout and not (tmp_path / "refs" / "results.json").exists()
    (tmp_path / "file").write_text("x")
    result = _search(tmp_path / "file" / "out")
    assert result.returncode != 0 and "is a file, not a folder" in result.stderr, result.stderr[-2000:]


@functools.cache
def _script():
    # Once per process: the script defines its absl flags when it loads.
    spec = importlib.util.spec_from_file_location("search_script", ROOT / "examples" / "search.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_uniform_reference_quantizes_what_the_search_quantized_and_costs_what_the_cost_model_says():
    searched = fliqs_keras.apply(fliqs_keras.models.digits_resnet(), {"*": ["int2", "int4"], "logits": None})
    reference = fliqs_keras.apply(fliqs_keras.models.digits_resnet(), _script()._uniform_space(searched, "int4"))
    assert fliqs_keras.report(reference)["logits"].status == "float"
    assert fliqs_keras.cost.bops(reference) == fliqs_keras.cost.CostModel(searched).uniform("int4")


def test_the_verdict_names_the_best_uniform_format_within_the_budget_and_float():
    script = _script()
    references = {"float": {"cost": 64.0, "test_accuracy": 0.95}, "int2": {"cost": 0.5, "test_accuracy": 0.80},
                  "int4": {"cost": 1.0, "test_accuracy": 0.90}, "int8": {"cost": 4.0, "test_accuracy": 0.94}}
    line = script.verdict(1.05, 0.92, 1.1, references)
    assert line == ("the searched formats beat uniform int4, the most accurate uniform format within the budget, "
                    "by 2.00 points at 1.05x its cost; 3.00 points below float.")
    line = script.verdict(2.2, 0.85, 1.1, references)
    assert line.startswith("over budget: the searched formats cost 2.00x the budget; the searched formats trail "
                           "uniform int4") and "by 5.00 points" in line
    assert script.verdict(1.0, 0.9, 0.4, references) == ("over budget: the searched formats cost 2.50x the budget; "
                                                         "no uniform reference fits the budget; 5.00 points below "
                                                         "float.")
    assert script.verdict(1.0, 0.9, 1.1, {}) == "no references trained (--references)."
