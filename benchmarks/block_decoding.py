"""Decoding speed of a block-diffusion model over its KV cache against full-canvas semi-AR
decoding (issue 25, item 4), on tiny models trained briefly on one task.

Task: a prompt of 3 to 6 tokens, answered by the prompt reversed and `<eos>`. Two networks of
the same size are trained with the same steps and data: a block model (`objective=block`,
block size 4) and a full-canvas MDM (its canvas `<eos>`-filled, as LLaDA trains). On the same
test prompts, greedy, one token unmasked per call:

- block, KV cache: `generate_block` (each block over the cache, rows stop at `<eos>`);
- block, no cache: `generate_block(kv_cache=False)`, the whole canvas block-causally per call;
- MDM semi-AR: `generate_mdm` over the whole canvas, blocks of `default_block_length`.

Quality: exact-match accuracy, and whether the two block decoders' outputs are identical.
Speed: output tokens (before `<eos>`) per wall second, the wall and process CPU times, and the
speed-up as the MDM's wall time over the decoder's.

    .venv/bin/python benchmarks/block_decoding.py          # about two minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import time

import torch

from stablemdm.estimators.objective import Objective
from stablemdm.evaluation.decoding import generate_block, generate_mdm
from stablemdm.evaluation.scoring import default_block_length
from stablemdm.models import ModelConfig, Transformer

PAD, MASK, EOS, VOCAB, LENGTH, BLOCK = 0, 1, 2, 16, 16, 4
IDS = dict(mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD)


def rows(n: int, generator: torch.Generator, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 3 to 6 tokens, each followed by itself reversed and `<eos>`; the rest of
    the row `fill` (eligible when it is `<eos>`, the MDM's canvas). Ids and eligible `[n, L]`."""
    ids = torch.full((n, LENGTH), fill)
    eligible = torch.zeros(n, LENGTH, dtype=torch.bool)
    for b in range(n):
        size = int(torch.randint(3, 7, (1,), generator=generator))
        prompt = torch.randint(3, VOCAB, (size,), generator=generator)
        ids[b, : 2 * size + 1] = torch.cat([prompt, prompt.flip(0), torch.tensor([EOS])])
        eligible[b, size : LENGTH if fill == EOS else 2 * size + 1] = True
    return ids, eligible


def trained(kind: str, steps: int, max_seq_len: int) -> Transformer:
    """A tiny transformer trained `steps` AdamW steps as a block model or a full-canvas MDM."""
    block = BLOCK if kind == "block" else None
    config = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=max_seq_len,
        mask_token_id=MASK, block_size=block,
    )  # fmt: skip
    net = Transformer(config, generator=torch.Generator().manual_seed(0))
    objective = Objective(MASK, kind=kind, block_size=block)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data, gens = torch.Generator().manual_seed(1), (torch.Generator().manual_seed(2),) * 2
    for _ in range(steps):
        ids, eligible = rows(32, data, PAD if kind == "block" else EOS)
        loss = objective(net, {"input_ids": ids, "eligible": eligible}, *gens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def timed(decode, prompts: list[list[int]]) -> dict:
    """Outputs, accuracy and speed of one decoder on `prompts`."""
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = decode(prompts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(map(len, outputs))
    correct = sum(out == p[::-1] for out, p in zip(outputs, prompts, strict=True))
    return dict(outputs=outputs, accuracy=correct / len(prompts), wall=wall, cpu=cpu,
                tokens_per_s=tokens / wall)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--gen-lengths", default="64,256")
    args = parser.parse_args()
    lengths = [int(g) for g in args.gen_lengths.split(",")]
    models = {kind: trained(kind, args.train_steps, 8 + max(lengths)) for kind in ("block", "mdm")}
    ids, eligible = rows(args.prompts, torch.Generator().manual_seed(99), PAD)
    prompts = [row[: int(e.long().argmax())].tolist() for row, e in zip(ids, eligible, strict=True)]
    print(f"{args.train_steps} training steps, {args.prompts} prompts, batch of all, 1 thread")
    print("| gen_length | decoder | accuracy | tokens/s | wall s | CPU s | MDM wall / wall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for g in lengths:
        block = dict(model=models["block"], gen_length=g, **IDS)
        runs = {
            "MDM semi-AR (full canvas)": lambda p, g=g: generate_mdm(
                models["mdm"], p, gen_length=g, steps=g, block_length=default_block_length(g),
                **IDS),
            "block, no cache": lambda p, b=block: generate_block(prompts=p, kv_cache=False, **b),
            "block, KV cache": lambda p, b=block: generate_block(prompts=p, **b),
        }  # fmt: skip
        results = {name: timed(decode, prompts) for name, decode in runs.items()}
        base = results["MDM semi-AR (full canvas)"]["wall"]
        for name, r in results.items():
            cells = [g, name, f"{r['accuracy']:.3f}", f"{r['tokens_per_s']:.0f}"]
            cells += [f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{base / r['wall']:.1f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
        same = results["block, no cache"]["outputs"] == results["block, KV cache"]["outputs"]
        print(f"gen_length {g}: block outputs with and without the cache identical: {same}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
