"""Training-step throughput of the MDM objectives and the ARM on the same network and batch.

The configurations are timed interleaved (round-robin, several rounds) so that machine noise
hits all of them alike; the report is tokens/s per configuration and its ratio to the ARM.

    .venv/bin/python benchmarks/throughput.py [--preset small] [--length 128] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stablemdm.models import ModelConfig, Transformer
from stablemdm.objective import Objective
from stablemdm.tokenizer import CharTokenizer

CONFIGS = {
    "arm": dict(kind="arm"),
    "mdm standard": dict(),
    "mdm mirror": dict(masking="mirror"),
    "mdm count": dict(rate="count"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset (tiny, small, base)")
    parser.add_argument("--length", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()

    tok = CharTokenizer()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(4, tok.vocab_size, (args.batch, args.length), generator=g),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.bool),
        "eligible": torch.zeros(args.batch, args.length, dtype=torch.bool),
    }
    batch["eligible"][:, args.length // 4 :] = True  # a quarter prompt, the rest response
    tokens = args.batch * args.length
    models, optims, objectives = {}, {}, {}
    for name, options in CONFIGS.items():
        cfg = ModelConfig.from_preset(
            args.preset,
            vocab_size=tok.vocab_size,
            max_seq_len=args.length,
            causal=options.get("kind") == "arm",
            mask_token_id=tok.mask_token_id,
        )
        models[name] = Transformer(cfg, generator=torch.Generator().manual_seed(1))
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
        objectives[name] = Objective(tok.mask_token_id, **options)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}

    def step(name: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = objectives[name](models[name], batch, g, g).loss
        loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    for name in CONFIGS:  # warm-up
        step(name)
    for _ in range(args.rounds):
        for name in CONFIGS:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)
    params = models["arm"].num_parameters()
    print(
        f"preset {args.preset} ({params / 1e6:.2f}M parameters), batch {args.batch} x "
        f"length {args.length}, bf16={args.bf16}, torch threads {torch.get_num_threads()}"
    )
    arm = statistics.median(times["arm"])
    print(f"{'configuration':<14} {'s/step':>8} {'tokens/s':>10} {'vs ARM':>7}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<14} {t:8.3f} {tokens / t:10.0f} {arm / t:7.2f}")


if __name__ == "__main__":
    main()
