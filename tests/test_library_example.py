"""The library example (`examples/hf_trainer.py`) runs as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hf_trainer_example_trains_reloads_and_decodes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = ROOT / "examples" / "hf_trainer.py"
    done = subprocess.run(
        [sys.executable, str(script), "--output", str(tmp_path), "--steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("trained 3 steps; losses [") for line in lines)
    assert sum(" -> " in line and "(gold " in line for line in lines) == 8
    assert (tmp_path / "run" / "config.json").is_file()
