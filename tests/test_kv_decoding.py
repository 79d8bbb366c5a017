"""Block-by-block decoding over a KV cache (issue 25, item 4): on a tiny trained block model
it gives exactly the tokens of the uncached block-causal decoder, each call runs only the
block being denoised, a block never sees a later one, rows stop at `<eos>` (`gen_length` is a
cap) and leave the batch, prompts of different lengths decode as they do alone, and `eval` and
`generate` of a block run use it (`--no-kv-cache`: the uncached decoder)."""

import json

import pytest
import torch
from test_block_runs import _config

from stablemdm.cli import main
from stablemdm.estimators.blocks import response_blocks
from stablemdm.estimators.objective import Objective
from stablemdm.evaluation import decoding
from stablemdm.evaluation.decoding import generate
from stablemdm.models import ModelConfig, Transformer
from stablemdm.models.kv_cache import KVCache
from stablemdm.training.run import train

PAD, MASK, EOS, VOCAB, LENGTH, BLOCK = 0, 1, 2, 16, 16, 4
IDS = dict(mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD)


def _rows(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Prompts of 3 to 6 tokens, each followed by itself reversed and `<eos>`, padded to LENGTH."""
    input_ids = torch.full((n, LENGTH), EOS)
    eligible = torch.zeros(n, LENGTH, dtype=torch.bool)
    for b in range(n):
        size = int(torch.randint(3, 7, (1,), generator=generator))
        prompt = torch.randint(3, VOCAB, (size,), generator=generator)
        input_ids[b, :size], input_ids[b, size : 2 * size] = prompt, prompt.flip(0)
        input_ids[b, 2 * size + 1 :], eligible[b, size : 2 * size + 1] = PAD, True
    return {"input_ids": input_ids, "eligible": eligible}


def _trained() -> Transformer:
    """A tiny transformer trained briefly with the block objective (block size 4)."""
    torch.set_num_threads(1)
    config = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, mask_token_id=MASK
    )
    config.block_size = BLOCK
    net = Transformer(config, generator=torch.Generator().manual_seed(0))
    objective = Objective(MASK, kind="block", block_size=BLOCK)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data, gens = torch.Generator().manual_seed(1), (torch.Generator().manual_seed(2),) * 2
    for _ in range(250):
        loss = objective(net, _rows(32, data), *gens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _trained()


def _prompts(n: int, seed: int) -> list[list[int]]:
    batch = _rows(n, torch.Generator().manual_seed(seed))
    return [row[: int(e.long().argmax())].tolist() for row, e in zip(*batch.values(), strict=True)]


def _calls(monkeypatch, model: Transformer) -> list[tuple[int, int]]:
    """The (rows, positions) of each cached model call."""
    seen: list[tuple[int, int]] = []
    forward = model.forward_cached

    def counted(input_ids, *args, **kwargs):
        seen.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward_cached", counted)
    return seen


@pytest.mark.parametrize("gen_length, steps", [(12, None), (10, None), (12, 6)])
def test_the_cache_gives_the_uncached_decoders_tokens(model, gen_length, steps):
    """Greedy: the same tokens as the block-causal decoder over the whole canvas, a short last
    block (10) and two tokens a call (steps 6) included."""
    prompts = _prompts(16, 3)
    options = dict(objective="block", gen_length=gen_length, steps=steps, **IDS)
    cached = generate(model, prompts, **options)
    assert cached == generate(model, prompts, kv_cache=False, **options)
    assert len({tuple(out) for out in cached}) > 3  # the rows' outputs differ


def test_each_call_runs_the_block_alone_over_the_earlier_blocks(model):
    """A cached call's logits are the block-causal model's at that block, whatever the later
    blocks hold (here random tokens), and each call runs only the block's own positions."""
    prompt, blocks = torch.tensor([[7, 3, 9, 4, 12]]), torch.randint(3, VOCAB, (1, 12))
    blocks[0, 4:8] = MASK  # block 2 is being denoised; block 3 holds tokens it must not see
    x = torch.cat([prompt, blocks], dim=1)  # [1, 17]
    block_ids = response_blocks(torch.arange(17)[None] >= 5, BLOCK)
    expected = model(x, torch.ones_like(x), block_ids=block_ids)[:, 9:13]
    cache = KVCache.empty(1)
    with torch.no_grad():
        model.forward_cached(prompt, torch.arange(5)[None], cache, store=True)
        model.forward_cached(blocks[:, :4], torch.arange(5, 9)[None], cache, store=True)
        got = model.forward_cached(blocks[:, 4:8], torch.arange(9, 13)[None], cache)
    torch.testing.assert_close(got, expected)
    assert cache.valid.shape == (1, 9)  # the prompt and block 1, never block 2 or 3


def test_rows_stop_at_eos_and_leave_the_batch(model, monkeypatch):
    """`gen_length` is a cap: with 12 or 48 the outputs (all ended by `<eos>`) and the calls
    are the same; a row leaves the batch after its block with `<eos>`; no call runs more than
    a block. (The briefly trained model rarely ends mid-canvas, so id 8 is `<eos>` here.)"""
    ids = {**IDS, "eos_token_id": 8}
    candidates = _prompts(32, 5)
    uncached = generate(model, candidates, objective="block", gen_length=12, kv_cache=False, **ids)
    ends = [len(out) // BLOCK for out in uncached]  # the block with each row's <eos>
    prompts = [p for p, end in zip(candidates, ends, strict=True) if end == 0][:3]
    prompts += [p for p, end in zip(candidates, ends, strict=True) if 0 < end < 3][:3]
    calls = _calls(monkeypatch, model)
    short = generate(model, prompts, objective="block", gen_length=12, **ids)
    short_calls = list(calls)
    calls.clear()
    long = generate(model, prompts, objective="block", gen_length=48, **ids)
    assert short == long and calls == short_calls
    going = [sum(len(out) // BLOCK >= j for out in long) for j in range(4)]  # rows in block j
    expected = [rows for j in range(3) for rows in [going[j]] * BLOCK + [going[j + 1]] if rows]
    assert calls[1:] == [(rows, BLOCK) for rows in expected] and going[0] > going[1] > 0


def test_prompts_of_different_lengths_decode_as_they_do_alone(model):
    prompts = _prompts(6, 4)
    assert len({len(p) for p in prompts}) > 1
    together = generate(model, prompts, objective="block", gen_length=12, **IDS)
    alone = [generate(model, [p], objective="block", gen_length=12, **IDS)[0] for p in prompts]
    assert together == alone


def test_only_a_block_model_decodes_over_a_cache():
    net = Transformer(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, mask_token_id=1))
    with pytest.raises(ValueError, match="only a block-diffusion model"):
        net.forward_cached(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2), KVCache.empty(1))


def test_eval_and_generate_of_a_block_run_use_the_cache(tmp_path, capsys, monkeypatch):
    train(_config(tmp_path, "r", "max_steps=2"))
    used = []
    decode = decoding.decode_cached
    monkeypatch.setattr(
        decoding, "decode_cached", lambda *a, **k: used.append(1) or decode(*a, **k)
    )
    run, out = tmp_path / "r", str(tmp_path / "e.jsonl")
    assert main(["eval", str(run), "--limit", "2", "--output", out]) == 0
    assert main(["generate", str(run), "--prompt", "3-4"]) == 0
    assert len(used) == 2
    cached = capsys.readouterr().out.splitlines()[-1]
    assert main(["generate", str(run), "--prompt", "3-4", "--no-kv-cache"]) == 0
    assert main(["eval", str(run), "--limit", "2", "--output", out + "2", "--no-kv-cache"]) == 0
    assert len(used) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == cached and json.loads(lines[-1])["objective"] == "block"
