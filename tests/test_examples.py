"""The example scripts run end to end on the offline data."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
