"""Refitting P-POTS during training and StraTS over the global batch: estimates stay unbiased
through refits (Monte Carlo against the objective computed exactly by enumerating every mask
pattern), a resumed run with refits reproduces the uninterrupted one bit for bit, and the
strata cover each optimizer step's rates exactly once across processes and micro-batches."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_objective import MASK, exact_rate_objective, toy  # noqa: F401 (toy is a fixture)
from test_trainer import SMALL, _Kill, _losses, launch_two

from stablemdm.errors import ConfigError
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.ppots_fit import FitDesign, fit_ppots
from stablemdm.estimators.stratified import Stratified
from stablemdm.models import Transformer
from stablemdm.rng import seeded_generator
from stablemdm.training.callbacks import RefitCallback
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.trainer import rate_slice

Z = 5.0  # tolerance in standard errors


pytestmark = pytest.mark.usefixtures("one_thread")


class _Log:
    """Stands in for the trainer: keeps what RefitCallback logs."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def log(self, logs: dict) -> None:
        self.lines.append(logs)


def test_estimates_stay_unbiased_through_refits(toy):  # noqa: F811
    """Every 10 steps the density is refitted from fresh noisy draws (1 mask per count), so
    it keeps changing; each step's estimate uses the density it drew from, so the mean of
    all steps is the exact objective."""
    model, batch = toy
    eps = 1e-3
    density = PPOTS.from_function(lambda t: 1.0 + 0.0 * t, mix=0.2)
    design = FitDesign(masks=1, mix=0.2)
    objective = Objective(MASK, eps=eps, sampler=Stratified(density))

    def refit(step: int) -> PPOTS:
        generator = torch.Generator().manual_seed(step)
        return fit_ppots(Objective(MASK, eps=eps), model, batch, batch, generator, design)

    log = _Log()
    callback = RefitCallback(log, density, refit, every=10)
    estimates, shapes = [], set()
    with torch.no_grad():
        for step in range(1500):
            out = objective(
                model, batch, seeded_generator(0, "r", step), seeded_generator(0, "m", step)
            )
            estimates.append(out.loss.item())
            control = SimpleNamespace(should_log=True)
            callback.on_step_end(None, SimpleNamespace(global_step=step + 1), control)
            assert control.should_log
            shapes.add(round(density.heights[0].item(), 6))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    se = estimates.std().item() / math.sqrt(len(estimates))
    exact = exact_rate_objective(model, batch, eps)
    assert abs(estimates.mean().item() - exact) < Z * se, (estimates.mean().item(), exact, se)
    assert len(shapes) > 100 and len(log.lines) == 150  # it refitted and logged each time
    assert density.heights[0] > 2 * density.heights[-1]  # to a density that favours t -> 0
    assert "ppots/ratio_to_standard" in log.lines[-1]


@pytest.mark.parametrize("compute_matched", [False, True])
def test_strats_covers_the_optimizer_step_once(toy, compute_matched):  # noqa: F811
    """2 processes x 2 micro-batches: the slices of one step's shared draw hold exactly one
    rate per stratum of the 4 n rates (n sequences per micro-batch, half under
    compute_matched MIRROR)."""
    model, batch = toy
    batch = {k: v.repeat(2, 1) for k, v in batch.items()}  # 4 sequences per micro-batch
    masking = "mirror" if compute_matched else "iid"
    base = PPOTS.from_function(lambda t: 1.0 / (t + 0.05), n_bins=64)
    objective = Objective(
        MASK, sampler=Stratified(base), masking=masking, compute_matched=compute_matched
    )
    world, accumulation = 2, 2
    rates = []
    for micro in range(accumulation):
        for rank in range(world):
            part, parts = rate_slice(micro, rank, world, accumulation)
            out = objective(
                model,
                batch,
                seeded_generator(0, "rate", 7),
                seeded_generator(0, "mask", 7, micro, rank),
                rank=part,
                world_size=parts,
            )
            rates.append(out.rate.double())
    u = base.cdf(torch.cat(rates))  # [world x accumulation x n] in the base's CDF space
    n = 2 if compute_matched else 4
    assert len(u) == world * accumulation * n
    assert sorted(torch.floor(u * len(u)).long().tolist()) == list(range(len(u)))
    assert sorted({rate_slice(j, r, 2, 2)[0] for j in range(2) for r in range(2)}) == [0, 1, 2, 3]


@pytest.mark.parametrize("compute_matched", [False, True])
def test_strats_keeps_a_short_micro_batch_in_its_own_strata(toy, compute_matched):  # noqa: F811
    """An epoch ending on a short micro-batch: 2 processes x 2 micro-batches of nominally 4
    sequences, the second only 2. Every rate of the step lies in its own stratum of the
    nominal 16 (the short one takes the first rates of its slice), for every seed."""
    model, batch = toy
    full = {k: v.repeat(2, 1) for k, v in batch.items()}  # 4 sequences
    short = {k: v[:2] for k, v in full.items()}
    masking = "mirror" if compute_matched else "iid"
    base = PPOTS.from_function(lambda t: 1.0 / (t + 0.05), n_bins=64)
    objective = Objective(
        MASK, sampler=Stratified(base), masking=masking, compute_matched=compute_matched
    )
    nominal = 2 if compute_matched else 4
    for seed in range(20):
        rates = []
        for micro, data in enumerate((full, short)):
            for rank in range(2):
                part, parts = rate_slice(micro, rank, 2, 2)
                out = objective(
                    model,
                    data,
                    seeded_generator(seed, "rate", 7),
                    seeded_generator(seed, "mask", 7, micro, rank),
                    rank=part,
                    world_size=parts,
                    micro_batch_size=4,
                )
                rates.append(out.rate.double())
        u = base.cdf(torch.cat(rates))  # [12] (or [6]) in the base's CDF space
        strata = torch.floor(u * 4 * nominal).long().tolist()
        assert len(strata) == 3 * nominal and len(set(strata)) == len(strata), (seed, strata)


def test_a_training_epoch_ending_on_a_short_micro_batch_keeps_the_step_stratified(tmp_path):
    """28 sequences in micro-batches of 8, 2 per step: the second step's micro-batches hold 8
    and 4 sequences; its 12 rates lie in 12 different strata of the nominal 16."""
    from stablemdm.training.trainer import StableMDMTrainer

    draws: dict[int, list[float]] = {}
    record = StableMDMTrainer._record

    def logged(self, out, inputs):
        u = self.objective.sampler.cdf(out.rate.double()).tolist()
        draws.setdefault(self.state.global_step, []).extend(u)
        record(self, out, inputs)

    extra = ["task_options={n_train: 28, n_test: 4}", "gradient_accumulation_steps=2"]
    extra += ["max_steps=-1", "num_train_epochs=1", "scheme=stratified", "save_strategy=no"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableMDMTrainer, "_record", logged)
        train(_config(tmp_path, "short", *extra))
    assert [len(draws[s]) for s in sorted(draws)] == [16, 12]
    for u in draws.values():
        strata = [math.floor(x * 16) for x in u]
        assert len(set(strata)) == len(strata), strata


def _config(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [*SMALL, f"output_dir={tmp_path / name}", *extra])


def test_resume_after_a_refit_reproduces_the_uninterrupted_run(tmp_path):
    steps = [
        "max_steps=8",
        "save_steps=4",
        "sampler=ppots",
        "ppots_sequences=4",
        "ppots_refit_steps=3",
        "scheme=stratified",
        "gradient_accumulation_steps=2",
    ]
    train(_config(tmp_path, "full", *steps))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, "cut", *steps), callbacks=[_Kill(7)])
    train(_config(tmp_path, "cut", *steps), resume=True)  # from checkpoint-4; refits at 6
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [cut[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]
    a = Transformer.from_pretrained(tmp_path / "full").state_dict()
    b = Transformer.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = json.loads((tmp_path / "full" / "ppots.json").read_text())
    assert final == json.loads((tmp_path / "cut" / "ppots.json").read_text())
    first = json.loads((tmp_path / "full" / "checkpoint-4" / "ppots.json").read_text())
    assert final["heights"] != first["heights"]  # the refit at step 6 changed the density
    refits = [
        json.loads(line)
        for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
        if "ppots/ratio_to_standard" in line
    ]
    assert [r["step"] for r in refits] == [3, 6]
    assert all(0 < r["ppots/ratio_to_optimal"] for r in refits)


def test_two_processes_refit_alike_and_stratify_the_global_batch(tmp_path):
    """2 gloo processes x 2 micro-batches of 4: per optimizer step, the 16 rates hold one per
    stratum of the density they were drawn from, and both processes sample the same density,
    before and after the refit at step 2."""
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys, torch
        from stablemdm.training.recipe import load_config
        from stablemdm.training.run import train
        from stablemdm.training.trainer import StableMDMTrainer

        record = StableMDMTrainer._record
        rank = int(os.environ["RANK"])

        def logged(self, out, inputs):
            sampler = self.objective.sampler
            u = sampler.cdf(out.rate.double()).tolist()
            heights = sampler.base.heights.tolist()
            with open(r"{tmp_path}/draws-%d.jsonl" % rank, "a") as f:
                line = {{"step": self.state.global_step, "u": u, "h": heights}}
                f.write(json.dumps(line) + "\\n")
            record(self, out, inputs)

        StableMDMTrainer._record = logged
        train(load_config(None, sys.argv[1:]))
    """)
    )
    args = [
        *SMALL,
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        f"output_dir={tmp_path / 'ddp'}",
        "max_steps=4",
        "save_steps=4",
        "scheme=stratified",
        "sampler=ppots",
        "ppots_sequences=3",
        "ppots_refit_steps=2",
        "ddp_backend=gloo",
    ]
    drawn = [tmp_path / f"draws-{r}.jsonl" for r in (0, 1)]
    launch_two(script, args, [tmp_path / "ddp", *drawn])
    draws = [
        [json.loads(line) for line in (tmp_path / f"draws-{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    for step in range(4):
        mine = [[d for d in draws[r] if d["step"] == step] for r in (0, 1)]
        assert [len(m) for m in mine] == [2, 2]  # two micro-batches on each process
        heights = {json.dumps(d["h"]) for m in mine for d in m}
        assert len(heights) == 1  # one density on both processes within the step
        u = torch.tensor([x for m in mine for d in m for x in d["u"]])
        assert sorted(torch.floor(u * 16).long().tolist()) == list(range(16))
    before, after = draws[0][0]["h"], draws[0][-1]["h"]
    assert before != after  # refitted at step 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppots_refit_steps=10"], "ppots_refit_steps is only used with sampler=ppots"),
        (["sampler=ppots", "ppots_refit_steps=-1"], "ppots_refit_steps must be >= 0"),
        (["sampler=ppots", "ppots_counts=1"], "ppots_counts must be >= 2"),
        (["sampler=ppots", "ppots_method=spline"], "ppots_method must be one of"),
    ],
)
def test_bad_fit_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, "x", *overrides)
