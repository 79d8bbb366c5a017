"""The GPU check of the Hugging Face path runs end to end on CPU in its --tiny form."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hf_gpu_check_tiny_run_reports_throughput(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "hf_gpu.py"),
            "--tiny",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 4 and report["tokens_per_s_last_log"] > 0
    assert report["device"] == "cpu" and report["peak_memory_gib"] is None
