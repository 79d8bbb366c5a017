"""What each training method costs, side by side in one process (issue 11).

Part 1, the step: every method trains its own copy of one network on one fixed batch. The
repetitions are interleaved (round-robin, the order rotated each round) so that machine noise
hits all methods alike; every ratio is taken within a round, then summarised by its median
and range over the rounds. Reported per method: forward tokens/s (sequence-forward passes x
length per second), optimizer-step time, the activations saved for backward (the memory a
method adds on top of weights and optimizer state), and the share of the step spent drawing
t or k, building masks and computing weights (timed in isolation, interleaved the same way).

Part 2, the Trainer: the demo's training (`stablemdm.training.run.train`: tiny preset, batch 64,
chain_sum, logging and the checkpoint callbacks as in `make demo`) against the raw step loop
on the same model, optimizer, schedule and data, alternated over rounds.

    .venv/bin/python benchmarks/step.py                  # small preset, batch 32 x length 128
    .venv/bin/python benchmarks/step.py --bf16           # the step part under bf16 autocast
    .venv/bin/python benchmarks/step.py --quick          # one repetition of each, tiny sizes
    .venv/bin/python benchmarks/step.py --clock cpu      # CPU time: a machine shared with others
    .venv/bin/python benchmarks/step.py --methods "MIRROR fused,MIRROR sequential" --no-trainer
    .venv/bin/python benchmarks/step.py --methods "block 4,block 8" --no-trainer  # issue 25
    .venv/bin/python benchmarks/step.py --methods "block 4,block 4 MIRROR,block 4 2B (two rows)" \
        --no-trainer                          # MIRROR's layout per block (issue 25)

Block diffusion (`block B`) trains every token of a sequence in one pass over `[noised |
clean]`: its forward tokens are the batch's B x L, each costing a pass over 2L positions.
`block 4 MIRROR` scores the mirrored copy in the same pass, over `[noised | mirror | clean]`
(3L); `block 4 2B (two rows)` is what the other layout, each copy in its own `[noised |
clean]` row, costs: block 4 on twice the batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback, get_scheduler

from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.estimators.blocks import response_blocks
from stablemdm.estimators.ema import EMA
from stablemdm.estimators.losses import mdm_loss
from stablemdm.estimators.masking import mirror_masks, p_mask
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.ppots_fit import FamilyParams, family_density
from stablemdm.estimators.rates import Clipped
from stablemdm.estimators.stratified import Stratified
from stablemdm.estimators.syrm import Mirrored
from stablemdm.models import ModelConfig, Transformer
from stablemdm.tasks.registry import get_task
from stablemdm.training.build import build_model, build_objective
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.datasets import train_dataset
from stablemdm.training.run import train
from stablemdm.training.trainer import StableMDMTrainer

# a P-POTS density of the shape fits produce (cost does not depend on the shape)
Clock = Callable[[], float]
# wall time, or this process's CPU time: on a shared machine a one-thread run's CPU time
# measures its own work and not the time it waited for a core
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_NAMES = {v: k for k, v in CLOCKS.items()}
PPOTS_SHAPE = FamilyParams(a=4.0, b=0.5, A=1.0, r=1.0, q=2.0, k=0.5, m=1.0)
PROMPT_SHARE = 4  # the synthetic batch: the first 1/4 of each row is prompt, the rest response
MIB = 2**20
# the demo's training settings (src/stablemdm/studies/demo.yaml, `train:`), Standard method
DEMO = dict(
    task="chain_sum",
    task_options={"n_train": 20_000, "n_test": 200},
    model_preset="tiny",
    per_device_train_batch_size=64,
    learning_rate=0.002,
    warmup_steps=30,
    lr_scheduler_type="cosine",
    logging_steps=50,
    disable_tqdm=True,
    seed=42,
)


@dataclasses.dataclass
class Method:
    """One configuration: its objective, and how a step uses it. `sequential` runs MIRROR's
    two masked copies as two forward passes of B (the authors' way) instead of one of 2B;
    `batch_factor` repeats the batch (the Standard control for MIRROR's 2B forward)."""

    objective: Objective
    sequential: bool = False
    batch_factor: int = 1


def methods(mask_id: int, isad_id: int) -> dict[str, Method]:
    """Every method of the issue, named as in the paper (plus this project's)."""

    def ppots() -> PPOTS:
        return PPOTS.from_function(partial(family_density, params=PPOTS_SHAPE), mix=0.1)

    o = partial(Objective, mask_id)
    return {
        "ARM": Method(o(kind="arm")),
        "Standard": Method(o()),
        "P-POTS": Method(o(sampler=ppots())),
        "StraTS": Method(o(sampler=Stratified())),
        "SyRM": Method(o(sampler=Mirrored())),
        "EMA": Method(o(sampler=EMA(n_bins=20, decay=0.9, refresh_every=50, mix=0.1))),
        "ISAD": Method(o(masking="isad", isad_token_ids=(isad_id,))),
        "Clipped": Method(o(sampler=Clipped(0.2, 0.8))),
        "count": Method(o(rate="count")),
        "MIRROR fused": Method(o(masking="mirror")),
        "MIRROR sequential": Method(o(masking="mirror"), sequential=True),
        "P-POTS+MIRROR": Method(o(masking="mirror", sampler=ppots())),
        "MIRROR compute-matched": Method(o(masking="mirror", compute_matched=True)),
        "count+P-POTS+MIRROR": Method(o(rate="count", masking="mirror", sampler=ppots())),
        "Standard 2B (control)": Method(o(), batch_factor=2),
        "block 4": Method(o(kind="block", block_size=4)),
        "block 8": Method(o(kind="block", block_size=8)),
        "block 4 MIRROR": Method(o(kind="block", block_size=4, masking="mirror")),
        "block 4 2B (two rows)": Method(o(kind="block", block_size=4), batch_factor=2),
    }


def synthetic_batch(b: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids `[b, length]`, no padding, a quarter prompt and the rest eligible."""
    g = torch.Generator().manual_seed(seed)
    eligible = torch.zeros(b, length, dtype=torch.bool)
    eligible[:, length // PROMPT_SHARE :] = True
    return {
        "input_ids": torch.randint(4, vocab, (b, length), generator=g),
        "attention_mask": torch.ones(b, length, dtype=torch.bool),
        "eligible": eligible,
    }


def sequential_mirror(
    objective: Objective, model: Transformer, batch: dict, rate_g, mask_g
) -> tuple[torch.Tensor, int]:
    """MIRROR as two forward passes of B sequences, one per complementary mask; returns the
    loss (the weighted pair mean) and the forward passes."""
    x0, eligible = batch["input_ids"], batch["eligible"]  # [B, L]
    r, weight = objective.draw_rates(len(x0), rate_g)
    r, weight = r.to(x0.device), weight.to(x0.device)
    p = p_mask(r, objective.eps).float()  # [B]
    pair = [
        mdm_loss(model, x0, eligible, m, p, objective.mask_token_id, batch.get("attention_mask"))
        for m in mirror_masks(eligible, p, mask_g)
    ]
    per_sequence = 0.5 * (pair[0].per_sequence + pair[1].per_sequence) * weight.float()
    return per_sequence.mean(), 2 * len(x0)


def draw(objective: Objective, batch: dict, rate_g, mask_g) -> None:
    """What a step spends before the forward pass: rates (or counts), masks, weights (ISAD's
    likelihood ratio, count mode's 1/(|E| q(k))), and the EMA sampler's bookkeeping."""
    x0, eligible = batch["input_ids"], batch["eligible"]
    n = len(x0) // 2 if objective.compute_matched else len(x0)
    x0, eligible = x0[:n], eligible[:n]
    if objective.kind == "block":  # a rate per response block
        r, weight = objective.draw_block_rates({"input_ids": x0}, rate_g)
        blocks = response_blocks(eligible, objective.block_size)
        objective._block_masks(x0, eligible, blocks, r, weight, mask_g)
        return
    r, weight = objective.draw_rates(n, rate_g)
    if objective.rate == "count":
        objective._count_masks(eligible, r, mask_g)
    else:
        objective._rate_masks(x0, eligible, p_mask(r, objective.eps), weight, mask_g)
    objective.sampler.observe(r, torch.ones(n))
    objective.sampler.step()


class Bench:
    """Each method's model copy, optimizer and generators, and one timed step of it."""

    def __init__(self, methods: dict[str, Method], batch: dict, model_config: ModelConfig):
        self.methods, self.batch = methods, batch
        mdm = Transformer(model_config, generator=torch.Generator().manual_seed(1))
        self.models, self.optims, self.gens = {}, {}, {}
        for i, (name, method) in enumerate(methods.items()):
            model = copy.deepcopy(mdm)
            model.config = dataclasses.replace(model_config, causal=method.objective.kind == "arm")
            self.models[name] = model
            self.optims[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
            self.gens[name] = (torch.Generator().manual_seed(i), torch.Generator().manual_seed(i))
        self.params = mdm.num_parameters()

    def batch_of(self, method: Method) -> dict:
        f = method.batch_factor
        return {k: v.repeat(f, 1) for k, v in self.batch.items()} if f > 1 else self.batch

    def loss(self, name: str) -> tuple[torch.Tensor, int]:
        """The method's loss on the batch and its sequence-forward passes."""
        method, model = self.methods[name], self.models[name]
        batch, (rate_g, mask_g) = self.batch_of(method), self.gens[name]
        if method.sequential:
            return sequential_mirror(method.objective, model, batch, rate_g, mask_g)
        out = method.objective(model, batch, rate_g, mask_g)
        method.objective.sampler.observe(out.rate, out.unweighted)  # what the trainer does
        method.objective.sampler.step()
        return out.loss, out.forward_passes

    def step(self, name: str, bf16: bool) -> int:
        """One optimizer step; returns the forward tokens it processed."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, passes = self.loss(name)
        loss.backward()
        self.optims[name].step()
        self.optims[name].zero_grad(set_to_none=True)
        return passes * self.batch["input_ids"].shape[1]

    def draw_seconds(self, name: str, repeats: int, clock: Clock = time.perf_counter) -> float:
        """Seconds per call of `draw` for this method (mean over `repeats` calls)."""
        method = self.methods[name]
        if method.objective.kind == "arm":  # the ARM draws nothing
            return 0.0
        batch, gens = self.batch_of(method), (torch.Generator(), torch.Generator())
        start = clock()
        for _ in range(repeats):
            draw(method.objective, batch, *gens)
        return (clock() - start) / repeats

    def activation_mib(self, name: str, bf16: bool) -> float:
        """MiB of distinct tensors saved for backward by one forward (parameters excluded)."""
        params = {p.untyped_storage().data_ptr() for p in self.models[name].parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                self.loss(name)
        return sum(saved.values()) / MIB


def _summary(values: list[float]) -> dict[str, float]:
    """Median and range over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio(a: list[float], b: list[float], minus_one: bool = False) -> dict[str, float]:
    """`_summary` of the paired ratios a / b (each pair measured together), or a / b - 1."""
    return _summary([x / y - minus_one for x, y in zip(a, b, strict=True)])


def selected(table: dict[str, Method], only: list[str] | None) -> dict[str, Method]:
    """The methods named in `only` (all if None), always with ARM and Standard, the references;
    fewer methods make shorter rounds, so the paired times lie closer together."""
    if only is None:
        return table
    unknown = sorted(set(only) - set(table))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(table)}")
    return {k: v for k, v in table.items() if k in {"ARM", "Standard", *only}}


def measure_steps(
    preset: str,
    batch: int,
    length: int,
    steps: int,
    rounds: int,
    bf16: bool,
    only: list[str] | None = None,
    clock: Clock = time.perf_counter,
) -> dict:
    """Part 1: per method the step time, tokens/s, activations and draw share; ratios to
    Standard and to the ARM within each round."""
    tok = CharTokenizer()
    cfg = ModelConfig.from_preset(
        preset, vocab_size=tok.vocab_size, max_seq_len=length, mask_token_id=tok.mask_token_id
    )
    table = selected(methods(tok.mask_token_id, tok.token_id("-", where="ISAD token")), only)
    bench = Bench(table, synthetic_batch(batch, length, tok.vocab_size), cfg)
    names = list(table)
    for name in names:  # warm-up
        bench.step(name, bf16)
    seconds = {n: [] for n in names}
    tokens = {n: 0 for n in names}
    drawn = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            for _ in range(steps):
                tokens[name] = bench.step(name, bf16)
            seconds[name].append((clock() - start) / steps)
            drawn[name].append(bench.draw_seconds(name, max(1, 4 * steps), clock))
    rows = {}
    for name in names:
        s = seconds[name]
        rate = [tokens[name] / x for x in s]  # forward tokens/s per round
        rows[name] = {
            "forward_tokens": tokens[name],
            "step_s": _summary(s),
            "tokens_per_s": _summary(rate),
            "tokens_vs_standard": _ratio(
                rate, [tokens["Standard"] / y for y in seconds["Standard"]]
            ),
            "tokens_vs_arm": _ratio(rate, [tokens["ARM"] / y for y in seconds["ARM"]]),
            "step_vs_standard": _ratio(s, seconds["Standard"]),
            "step_vs_arm": _ratio(s, seconds["ARM"]),
            "draw_share": _ratio(drawn[name], s),
            "activation_mib": bench.activation_mib(name, bf16),
        }
    return {
        "preset": preset,
        "parameters": bench.params,
        "batch": batch,
        "length": length,
        "bf16": bf16,
        "steps_per_round": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "clock": CLOCK_NAMES[clock],
        "methods": rows,
    }


def demo_config(output_dir: Path, steps: int, n_train: int) -> StableMDMConfig:
    """The demo's Standard run for `steps` steps, one checkpoint at the end as the demo."""
    options = {**DEMO, "task_options": {"n_train": n_train, "n_test": 200}}
    return StableMDMConfig(output_dir=str(output_dir), max_steps=steps, save_steps=steps, **options)


class PairedRawStep(TrainerCallback):
    """After every Trainer step, one raw step of an identical model: the run's model,
    objective, optimizer (the Trainer's class and options), clipping and schedule on
    pre-stacked batches of the run's data, with no Trainer around it. Pairing the two step by
    step exposes both to the same machine load. `trainer_s[i]` is the wall time from the end
    of raw step i-1 to the end of Trainer step i (data loading, collation, the step, callbacks,
    logging: everything `train` does per step), `raw_s[i]` that of raw step i."""

    def __init__(self, config: StableMDMConfig, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        task = get_task(config.task, **config.task_options)
        self.model, tokenizer, canvas = build_model(config, task)
        self.data = train_dataset(task, tokenizer, canvas).tensors
        self.objective = build_objective(config, tokenizer)
        opt_cls, opt_kwargs = StableMDMTrainer.get_optimizer_cls_and_kwargs(config, self.model)
        self.optim = opt_cls(self.model.parameters(), **opt_kwargs)
        self.schedule = get_scheduler(
            config.lr_scheduler_type, self.optim, config.warmup_steps, config.max_steps
        )
        self.config, self.generator = config, torch.Generator().manual_seed(0)
        self.trainer_s: list[float] = []
        self.raw_s: list[float] = []
        self.mark, self.final_s = 0.0, 0.0

    def raw_step(self, i: int) -> None:
        """Optimizer step i of the bare loop."""
        b, n = self.config.per_device_train_batch_size, len(self.data["input_ids"])
        first = (i * b) % (n - b)
        batch = {k: v[first : first + b] for k, v in self.data.items()}  # [b, L] each
        self.objective(self.model, batch, self.generator, self.generator).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optim.step()
        self.schedule.step()
        self.optim.zero_grad(set_to_none=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.model.train()
        self.mark = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        self.trainer_s.append(now - self.mark)
        self.raw_step(len(self.raw_s))
        self.mark = self.clock()
        self.raw_s.append(self.mark - now)

    def on_train_end(self, args, state, control, **kwargs):
        self.final_s = self.clock() - self.mark  # the last log line and the checkpoint


def trainer_overhead(
    steps: int, n_train: int, demo_steps: int = 1000, clock: Clock = time.perf_counter
) -> dict:
    """Part 2: the Trainer's overhead over the raw step, paired step by step in one run. Per
    block of `logging_steps` steps after a warm-up block: the median of the paired
    differences over the median raw step (robust to the load bursts of a shared machine);
    over all steps after the warm-up: the ratio of mean times (logging included, bursts too);
    the end-of-run checkpoint as a share of the demo's `demo_steps` raw steps."""
    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config(Path(tmp), steps, n_train)
        paired = PairedRawStep(config, clock)
        train(config, callbacks=[paired])
    trained, raw = paired.trainer_s, paired.raw_s
    per = config.logging_steps if steps >= 3 * config.logging_steps else max(1, steps // 3)
    blocks = [range(i, i + per) for i in range(per, steps - per + 1, per)]
    overhead = [
        statistics.median(trained[i] - raw[i] for i in block)
        / statistics.median(raw[i] for i in block)
        for block in blocks
    ]
    return {
        "clock": CLOCK_NAMES[clock],
        "steps": steps,
        "block": per,
        "blocks": len(blocks),
        "raw_step_s": statistics.median(raw[per:]),
        "trainer_step_s": statistics.median(trained[per:]),
        "overhead": _summary(overhead),
        "overhead_of_means": statistics.mean(trained[per:]) / statistics.mean(raw[per:]) - 1,
        "final_checkpoint_s": paired.final_s,
        "final_share_of_demo": paired.final_s / (demo_steps * statistics.median(raw[per:])),
    }


def _fmt(s: dict[str, float], spec: str) -> str:
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def steps_table(result: dict) -> str:
    """Part 1 as a Markdown table: medians with the (min-max) range over rounds."""
    lines = [
        "| method | s/step | forward tokens/s | tokens/s vs Standard | tokens/s vs ARM | "
        "step time vs Standard | step time vs ARM | draw share of step | activations MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["methods"].items():
        share = {k: 100 * v for k, v in row["draw_share"].items()}
        lines.append(
            f"| {name} | {_fmt(row['step_s'], '.3f')} | {row['tokens_per_s']['median']:,.0f} | "
            f"{_fmt(row['tokens_vs_standard'], '.2f')} | {_fmt(row['tokens_vs_arm'], '.2f')} | "
            f"{_fmt(row['step_vs_standard'], '.2f')} | {_fmt(row['step_vs_arm'], '.2f')} | "
            f"{_fmt(share, '.2f')}% | {row['activation_mib']:.1f} |"
        )
    return "\n".join(lines)


def trainer_table(result: dict) -> str:
    """Part 2 as a Markdown table."""
    pct = {k: 100 * v for k, v in result["overhead"].items()}
    return "\n".join(
        [
            "| raw step s (median) | `training.run.train` step s (median) "
            "| Trainer overhead (median paired difference) | ratio of means - 1 "
            "| final checkpoint s (share of 1000 steps) |",
            "| --- | --- | --- | --- | --- |",
            f"| {result['raw_step_s']:.4f} | {result['trainer_step_s']:.4f} | {_fmt(pct, '.1f')}% "
            f"| {100 * result['overhead_of_means']:.1f}% | {result['final_checkpoint_s']:.2f} "
            f"({100 * result['final_share_of_demo']:.2f}%) |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="model preset of the step part")
    parser.add_argument("--length", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in the step part")
    parser.add_argument("--trainer-steps", type=int, default=300, help="steps per Trainer run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition each")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--methods", help="comma-separated methods of the step part (ARM, Standard always run)"
    )
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer part")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall", help="cpu: process CPU time (shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.preset, args.length, args.batch, args.steps, args.rounds = "tiny", 16, 4, 1, 1
        args.trainer_steps = 4
    only = args.methods.split(",") if args.methods else None
    steps = measure_steps(
        args.preset,
        args.batch,
        args.length,
        args.steps,
        args.rounds,
        args.bf16,
        only,
        CLOCKS[args.clock],
    )
    print(
        f"step: preset {steps['preset']} ({steps['parameters']:,} parameters), batch "
        f"{steps['batch']} x length {steps['length']}, bf16={steps['bf16']}, "
        f"{steps['rounds']} rounds x {steps['steps_per_round']} steps, "
        f"torch threads {steps['threads']}, {steps['clock']} clock\n"
    )
    print(steps_table(steps) + "\n")
    result = {"step": steps}
    if not args.no_trainer:
        n_train = 256 if args.quick else DEMO["task_options"]["n_train"]
        result["trainer"] = overhead = trainer_overhead(
            args.trainer_steps, n_train, clock=CLOCKS[args.clock]
        )
        print(
            f"trainer: demo sizes (tiny preset, batch 64, chain_sum), {overhead['steps']} "
            f"steps, {overhead['blocks']} blocks of {overhead['block']} after a warm-up block\n"
        )
        print(trainer_table(overhead))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
