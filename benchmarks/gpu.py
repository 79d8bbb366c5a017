"""The GPU step (issue 11): bf16 training steps of 125M and 350M parameter models built from
config, for the ARM, Standard, MIRROR fused (one 2B forward) vs sequential (two B forwards)
and count+P-POTS+MIRROR. Reports forward tokens/s, MFU and peak memory, in one command of
under ten minutes on an H100/H200, written as JSON and a Markdown table.

Each size has one model and one optimizer shared by its methods (the ARM switches the same
weights to causal attention), so peak memory compares like with like. bf16 autocast over fp32
weights, fused AdamW, SDPA without a padding mask (flash; the math fallback is disabled) and,
on a GPU, `torch.compile` of each transformer block (one compiled graph for all the blocks;
compile time is spent in the warm-up). Rates and masks are drawn from CPU generators and
moved, as the Trainer draws them. Repetitions are interleaved over the methods.

MFU = 6 N forward-tokens / time / peak, N the parameters without the input embedding (the
output head is a matmul, the embedding a lookup), attention's own FLOPs not counted; peak is
the card's dense bf16 rate (H100 SXM and H200: 989 TFLOP/s).

    python benchmarks/gpu.py --output runs/gpu             # on the GPU machine
    python benchmarks/gpu.py --output runs/gpu-cpu --tiny  # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from step import Method, methods, sequential_mirror
from torch.nn.attention import SDPBackend, sdpa_kernel

from stablemdm.models import ModelConfig, Transformer

GIB = 2**30
# dense bf16 peak, TFLOP/s, by the first name fragment found in the device name
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
LLAMA_VOCAB = 32_000  # the vocabulary of the GPU sizes; the last id is [MASK]
SIZES = {  # name: model shape, batch, length
    "125m": (dict(vocab_size=LLAMA_VOCAB, d_model=768, n_layers=12, n_heads=12), 32, 1024),
    "350m": (dict(vocab_size=LLAMA_VOCAB, d_model=1024, n_layers=24, n_heads=16), 16, 1024),
    "tiny": (dict(vocab_size=128, d_model=64, n_layers=2, n_heads=2), 2, 32),
}
METHODS = ("ARM", "Standard", "MIRROR fused", "MIRROR sequential", "count+P-POTS+MIRROR")
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def peak_tflops(device: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in PEAK_TFLOPS (no MFU then)."""
    return next((tf for name, tf in PEAK_TFLOPS if name in device), None)


def build(size: str, device: torch.device, compile_blocks: bool) -> tuple[Transformer, dict]:
    """The model of `size` on `device` (blocks compiled if asked) and its fixed batch
    (random ids, no padding, a quarter prompt)."""
    shape, b, length = SIZES[size]
    vocab = shape["vocab_size"]
    config = ModelConfig(max_seq_len=length, mask_token_id=vocab - 1, **shape)
    model = Transformer(config, generator=torch.Generator().manual_seed(0)).to(device)
    if compile_blocks:
        for block in model.blocks:
            block.compile(dynamic=False)
    g = torch.Generator().manual_seed(1)
    eligible = torch.zeros(b, length, dtype=torch.bool)
    eligible[:, length // 4 :] = True
    batch = {
        "input_ids": torch.randint(4, vocab - 1, (b, length), generator=g),
        "eligible": eligible,
    }
    return model, {k: v.to(device) for k, v in batch.items()}


def train_step(model, optim, method: Method, batch: dict, gens) -> int:
    """One bf16 optimizer step of `method`; returns its forward tokens."""
    model.config.causal = method.objective.kind == "arm"
    device = batch["input_ids"].device.type
    attention = sdpa_kernel(ATTENTION) if device == "cuda" else contextlib.nullcontext()
    with attention, torch.autocast(device, torch.bfloat16):
        if method.sequential:
            loss, passes = sequential_mirror(method.objective, model, batch, *gens)
        else:
            out = method.objective(model, batch, *gens)
            loss, passes = out.loss, out.forward_passes
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return passes * batch["input_ids"].shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(model: Transformer, batch: dict, steps: int, rounds: int, log) -> dict[str, dict]:
    """Warm up (compiling) each method, then time `steps` steps per method per round,
    interleaved; a method that runs out of memory is reported as such."""
    device = batch["input_ids"].device
    table = methods(model.config.mask_token_id, isad_id=4)
    chosen = {name: table[name] for name in METHODS}
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gens = (torch.Generator().manual_seed(2), torch.Generator().manual_seed(3))
    results: dict[str, dict] = {}
    for name, method in chosen.items():
        start = time.perf_counter()
        try:
            for _ in range(2):
                train_step(model, optim, method, batch, gens)
            _sync(device)
        except torch.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
            optim.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        log(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
    live = [n for n in chosen if n not in results]
    seconds: dict[str, list[float]] = {n: [] for n in live}
    peak: dict[str, int] = dict.fromkeys(live, 0)
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name in live[r % len(live) :] + live[: r % len(live)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                tokens[name] = train_step(model, optim, chosen[name], batch, gens)
            _sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    for name in live:
        s = statistics.median(seconds[name])
        results[name] = {
            "step_s": s,
            "step_s_range": [min(seconds[name]), max(seconds[name])],
            "forward_tokens": tokens[name],
            "tokens_per_s": tokens[name] / s,
            "peak_memory_gib": peak[name] / GIB if device.type == "cuda" else None,
        }
    return {name: results[name] for name in chosen}


def add_ratios(rows: dict[str, dict], n_params: int, peak: float | None) -> None:
    """MFU and the per-forward-token rate as a ratio to Standard and to the ARM."""
    for row in rows.values():
        if "error" in row:
            continue
        flops = 6 * n_params * row["tokens_per_s"]
        row["model_tflops"] = flops / 1e12
        row["mfu"] = flops / (peak * 1e12) if peak else None
        for ref in ("Standard", "ARM"):
            base = rows.get(ref, {}).get("tokens_per_s")
            row[f"tokens_vs_{ref.lower()}"] = row["tokens_per_s"] / base if base else None


def markdown(report: dict) -> str:
    """The report as one Markdown table per size."""
    out = [
        f"device: {report['device']}, torch {report['torch']}, compile {report['compile']}, "
        f"peak {report['peak_tflops']} TFLOP/s bf16\n"
    ]
    for size, entry in report["sizes"].items():
        out += [
            f"### {size}: {entry['parameters'] / 1e6:.1f}M parameters "
            f"({entry['flop_parameters'] / 1e6:.1f}M in 6N), batch {entry['batch']} x "
            f"length {entry['length']}\n",
            "| method | s/step | forward tokens/s | vs Standard | vs ARM | TFLOP/s | MFU | "
            "peak memory GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in entry["methods"].items():
            if "error" in row:
                out.append(f"| {name} | {row['error']} | | | | | | |")
                continue
            cells = [
                f"{row['step_s']:.4f}",
                f"{row['tokens_per_s']:,.0f}",
                _num(row["tokens_vs_standard"], ".3f"),
                _num(row["tokens_vs_arm"], ".3f"),
                f"{row['model_tflops']:.1f}",
                _num(row["mfu"], ".1%"),
                _num(row["peak_memory_gib"], ".1f"),
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(sizes: list[str], steps: int, rounds: int, compile_blocks: bool, output: Path) -> dict:
    """Measure every size, writing the JSON and Markdown report after each (a run cut short
    keeps what it finished)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.set_float32_matmul_precision("high")
    report = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "compile": compile_blocks,
        "peak_tflops": peak_tflops(name),
        "steps": steps,
        "rounds": rounds,
        "sizes": {},
    }
    output.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", flush=True)

    for size in sizes:
        log(f"{size}: building")
        model, batch = build(size, device, compile_blocks)
        rows = time_methods(model, batch, steps, rounds, log)
        n_flop = model.num_parameters(exclude_embeddings=True)
        add_ratios(rows, n_flop, report["peak_tflops"])
        b, length = batch["input_ids"].shape
        report["sizes"][size] = {
            "parameters": model.num_parameters(),
            "flop_parameters": n_flop,
            "batch": b,
            "length": length,
            "methods": rows,
        }
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (output / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        (output / "gpu.md").write_text(markdown(report))
        log(f"{size}: done")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for gpu.json, gpu.md")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, eager")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="compile blocks"
    )
    args = parser.parse_args()
    if args.tiny:
        report = run(["tiny"], 1, 1, False, args.output)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA device; use --tiny for the CPU smoke run")
        report = run(["125m", "350m"], args.steps, args.rounds, args.compile, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
