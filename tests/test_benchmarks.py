"""benchmarks/step.py and benchmarks/gpu.py run end to end at tiny sizes on CPU and count the
work of each method correctly (forward tokens, saved activations); benchmarks/block_decoding.py
decodes trained runs past their trained length with every decoder; no timing is asserted."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
B, L = 4, 16  # the step benchmark's tiny batch


@pytest.fixture
def bench(monkeypatch):
    """The benchmark scripts as modules (gpu.py imports step.py from its own folder), on one
    torch thread as the scripts run on this shared machine."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module("step"), importlib.import_module("gpu")
    torch.set_num_threads(threads)


def test_step_benchmark_times_every_method_of_the_issue_once(bench):
    step, _ = bench
    result = step.measure_steps("tiny", B, L, steps=1, rounds=1, bf16=False)
    rows = result["methods"]
    issue = {
        "ARM", "Standard", "P-POTS", "StraTS", "SyRM", "EMA", "ISAD", "Clipped", "count",
        "MIRROR fused", "MIRROR sequential", "P-POTS+MIRROR", "MIRROR compute-matched",
        "count+P-POTS+MIRROR",
    }  # fmt: skip
    assert issue <= set(rows)
    two_copies = {"MIRROR fused", "MIRROR sequential", "P-POTS+MIRROR", "count+P-POTS+MIRROR"}
    for name, row in rows.items():
        passes = 2 if name in two_copies or "2B" in name or name.endswith(" MIRROR") else 1
        assert row["forward_tokens"] == passes * B * L, name
        assert math.isfinite(row["draw_share"]["median"]) and row["draw_share"]["min"] >= 0
    assert rows["ARM"]["draw_share"]["median"] == 0.0
    assert rows["Standard"]["tokens_vs_standard"]["median"] == pytest.approx(1.0)
    standard = rows["Standard"]["activation_mib"]
    assert rows["MIRROR fused"]["activation_mib"] > 1.5 * standard  # two copies are saved
    assert (
        rows["MIRROR compute-matched"]["activation_mib"]
        < 0.75 * rows["MIRROR fused"]["activation_mib"]
    )
    table = step.steps_table(result)
    assert all(f"| {name} |" in table for name in rows)


def test_trainer_overhead_runs_the_demo_training_and_the_raw_loop(bench):
    step, _ = bench
    result = step.trainer_overhead(steps=4, n_train=128)
    assert result["blocks"] == 3 and result["block"] == 1  # 4 steps: a warm-up step, 3 blocks
    assert result["raw_step_s"] > 0 and result["trainer_step_s"] > 0
    assert result["final_checkpoint_s"] > 0  # the checkpoint is written at the end
    assert "Trainer overhead" in step.trainer_table(result)


def test_gpu_benchmark_tiny_cpu_run_writes_json_and_markdown(bench, tmp_path):
    _, gpu = bench
    gpu.run(["tiny"], steps=1, rounds=1, compile_blocks=False, output=tmp_path)
    report = json.loads((tmp_path / "gpu.json").read_text())
    entry = report["sizes"]["tiny"]
    rows, tokens = entry["methods"], entry["batch"] * entry["length"]
    assert list(rows) == list(gpu.METHODS)
    for name, row in rows.items():
        passes = 2 if "MIRROR" in name else 1
        assert row["forward_tokens"] == passes * tokens, name
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # no GPU, no peak
    assert rows["Standard"]["tokens_vs_standard"] == pytest.approx(1.0)
    assert "| MIRROR sequential |" in (tmp_path / "gpu.md").read_text()


def test_peak_tflops_by_card_name(bench):
    _, gpu = bench
    assert gpu.peak_tflops("NVIDIA H200") == gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("cpu") is None


def test_step_benchmark_runs_a_selection_with_its_references(bench):
    step, _ = bench
    result = step.measure_steps("tiny", B, L, steps=1, rounds=1, bf16=False, only=["count"])
    assert list(result["methods"]) == ["ARM", "Standard", "count"]
    with pytest.raises(SystemExit, match="unknown"):
        step.measure_steps("tiny", B, L, steps=1, rounds=1, bf16=False, only=["nope"])


def test_step_benchmark_can_time_on_the_process_cpu_clock(bench):
    step, _ = bench
    result = step.measure_steps(
        "tiny", B, L, steps=1, rounds=1, bf16=False, only=[], clock=step.CLOCKS["cpu"]
    )
    assert result["clock"] == "cpu" and all(
        row["step_s"]["median"] > 0 for row in result["methods"].values()
    )


@pytest.fixture
def block_decoding(monkeypatch, one_thread):
    """benchmarks/block_decoding.py as a module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("block_decoding")


def test_a_widened_model_keeps_its_outputs_and_takes_a_longer_canvas(block_decoding):
    from stablemdm.models import ModelConfig, Transformer

    config = ModelConfig(vocab_size=12, d_model=16, n_layers=1, max_seq_len=8, mask_token_id=1)
    model = Transformer(config, generator=torch.Generator().manual_seed(0)).eval()
    wide = block_decoding.widened(model, 16)
    ids = torch.randint(2, 12, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(wide(ids), model(ids))
        assert wide(torch.cat([ids, ids, ids], dim=1)).shape == (2, 24, 12)
    assert wide.config.max_seq_len == 24 and block_decoding.widened(model, 0) is model


def test_block_decoding_names_a_run_by_its_method_and_a_checkpoint_by_its_step(block_decoding):
    run = Path("runs/study/block4_standard/seed-42")
    assert block_decoding.run_name(run) == "block4_standard"
    assert block_decoding.run_name(run / "checkpoint-100") == "block4_standard@100"
    assert block_decoding.run_name(Path("runs/mine")) == "mine"


def test_block_decoding_compares_each_row_with_the_mdm_listed_last_before_it(block_decoding):
    def row(decoder, accuracy, wall):
        return dict(decoder=decoder, gen_length=64, accuracy=accuracy, se=0.01, wall=wall, cpu=wall)

    mdm, block = block_decoding.MDM, "block, KV cache"
    rows = [row(mdm, 0.0, 20.0), row(block, 0.0, 2.0), row(mdm, 0.5, 10.0), row(block, 0.5, 1.0)]
    block_decoding.compare(rows)
    assert [r["speedup"] for r in rows] == [1.0, 10.0, 1.0, 10.0]
    assert [r["same_quality"] for r in rows] == [True, True, True, True]
    with pytest.raises(SystemExit, match="MDM run before"):
        block_decoding.compare([row(block, 0.5, 1.0), row(mdm, 0.5, 10.0)])


def trained_runs(root: Path, kinds: dict[str, list[str]]) -> list[Path]:
    """A run trained one step on the small chain_sum setting per name, under
    root/NAME/seed-0, with its extra overrides."""
    from test_trainer import SMALL

    from stablemdm.training.recipe import load_config
    from stablemdm.training.run import train

    for name, extra in kinds.items():
        out = f"output_dir={root / name / 'seed-0'}"
        train(load_config(None, [*SMALL, out, "max_steps=1", "save_steps=1", *extra]))
    return [root / name / "seed-0" for name in kinds]


def test_block_decoding_benchmark_decodes_trained_runs_past_their_length(block_decoding, tmp_path):
    from stablemdm.training.saved import load_checkpoint

    kinds = {"mdm": [], "block": ["objective=block", "block_size=4"], "arm": ["objective=arm"]}
    folders = trained_runs(tmp_path, kinds)
    longer = 2 * load_checkpoint(folders[0])[0].config.max_seq_len  # past the trained length
    rows = block_decoding.run(folders, [longer], limit=3, batch_size=2)
    decoders = [(r["run"], r["decoder"]) for r in rows]
    assert decoders == [
        ("mdm", block_decoding.MDM), ("block", "block, KV cache"), ("block", "block, no cache"),
        ("arm", "ARM"),
    ]  # fmt: skip
    assert block_decoding.cache_identical(rows) == {("block", longer): True}
    base = rows[0]
    assert base["speedup"] == 1.0 and base["z"] == 0.0 and base["same_quality"]
    for r in rows:
        assert r["n"] == 3 and r["sequences_per_s"] * r["wall"] == pytest.approx(3)
        assert r["se"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 3))
        assert r["speedup"] == pytest.approx(base["wall"] / r["wall"])
        assert r["cpu_speedup"] == pytest.approx(base["cpu"] / r["cpu"])
    assert block_decoding.table(rows).count(f"| {longer} |") == 4


def test_block_decoding_benchmark_decodes_each_run_at_its_own_trained_canvas(
    block_decoding, tmp_path
):
    from stablemdm.training.saved import saved_run_config

    kinds = {
        "mdm-long": ["gen_length=24"],
        "block-long": ["gen_length=24", "objective=block", "block_size=4"],
        "mdm": [],
    }
    folders = trained_runs(tmp_path, kinds)
    own = saved_run_config(folders[2])["gen_length"]
    assert own < 24
    rows = block_decoding.run(folders, None, limit=3, batch_size=2)
    assert [(r["run"], r["gen_length"]) for r in rows] == [
        ("mdm", own), ("mdm-long", 24), ("block-long", 24), ("block-long", 24),
    ]  # fmt: skip
    assert [r["speedup"] for r in rows[:2]] == [1.0, 1.0]  # each canvas has its own baseline
    assert all(r["speedup"] == pytest.approx(rows[1]["wall"] / r["wall"]) for r in rows[1:])
    assert block_decoding.cache_identical(rows) == {("block-long", 24): True}
