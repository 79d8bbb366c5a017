"""Tests for the `stablemdm variance` experiment (variance/report.py).

Toy model used below: `PositionTable` outputs logits that depend on the position only, never
on the (masked) input, so the cross-entropy of eligible position i is a constant c_i whatever
is masked. With L eligible tokens, c_bar = mean c_i and sigma^2 = mean (c_i - c_bar)^2:

* Standard (t ~ U(0, 1), iid masks with p = p_mask(t) = (1 - eps) t + eps):
  l = (1 / (L p)) sum_i m_i c_i with m_i ~ Bernoulli(p), so E[l | t] = c_bar for every t
  (B = 0; C = 0 for identical sequences) and Var(l | t) = (1 - p) sum_i c_i^2 / (L^2 p).
  Hence Var(l) = A = (sum c_i^2 / L^2) * (ln(1/eps) / (1 - eps) - 1), because
  int_0^1 dt / p_mask(t) = ln(1/eps) / (1 - eps).
* Count mode with the uniform density: k is uniform on 1..L (weight 1/(L q(k)) = 1) and
  l = (1/k) sum_{i in M} c_i for a uniform k-subset M, the mean of a sample drawn without
  replacement: Var(l | k) = (sigma^2 / k) (L - k) / (L - 1). Averaging over k,
  Var(l) = sigma^2 (H_L - 1) / (L - 1) (H_L the harmonic number), far below Standard's
  (which is >= (sigma^2 + c_bar^2) (ln(1/eps)/(1 - eps) - 1) / L). Both cost one forward pass
  per sequence, so count mode must rank ahead at equal compute; a minibatch of n iid draws
  has 1/n of these variances.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from stablemdm.errors import ConfigError
from stablemdm.estimators import selection
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.rates import Uniform
from stablemdm.training.datasets import TensorDataset
from stablemdm.variance import command as vc
from stablemdm.variance import measure as vm
from stablemdm.variance import report as vr
from stablemdm.variance.output import PLOTS

EPS = 0.05  # a larger eps than training's keeps the 1/p tail short, so SEs are reliable
MASK_ID = 1
VOCAB = 12
PROMPT, L = 2, 8  # prompt tokens (never masked) and eligible tokens per sequence


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs dominate, and on a loaded 2-core machine two threads
    run these tests ~100x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PositionTable(torch.nn.Module):
    """Logits `[B, L, V]` from a per-position table, ignoring the input (see the docstring)."""

    def __init__(self, length: int, fill: float | None = None) -> None:
        super().__init__()
        table = torch.randn(length, VOCAB, generator=torch.Generator().manual_seed(5))
        self.table = torch.nn.Parameter(table if fill is None else torch.full_like(table, fill))

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.table.expand(input_ids.shape[0], -1, -1)


def toy_data(n: int) -> tuple[TensorDataset, torch.Tensor]:
    """n copies of one sequence and the per-position cross-entropies c `[L]` of `PositionTable`."""
    x0 = torch.randint(4, VOCAB, (PROMPT + L,), generator=torch.Generator().manual_seed(3))
    eligible = torch.arange(PROMPT + L) >= PROMPT
    data = TensorDataset(
        {
            "input_ids": x0.repeat(n, 1),
            "attention_mask": torch.ones(n, PROMPT + L, dtype=torch.bool),
            "eligible": eligible.repeat(n, 1),
        }
    )
    model = PositionTable(PROMPT + L)
    c = torch.nn.functional.cross_entropy(model.table.detach(), x0, reduction="none")[PROMPT:]
    return data, c.double()


def standard_variance(c: torch.Tensor) -> float:
    """Var of one Standard draw on the toy (module docstring)."""
    integral = math.log(1.0 / EPS) / (1.0 - EPS)
    return float((c**2).sum() / L**2) * (integral - 1.0)


def count_variance(c: torch.Tensor) -> float:
    """Var of one count-mode draw on the toy (module docstring)."""
    harmonic = sum(1.0 / k for k in range(1, L + 1))
    sigma2 = float(((c - c.mean()) ** 2).mean())
    return sigma2 * (harmonic - 1.0) / (L - 1)


def p_mask(t: np.ndarray) -> np.ndarray:
    return (1.0 - EPS) * t + EPS


# --- the report on a tiny model, through the command line ---------------------------------


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """One `stablemdm variance` run (small design) on a 1-layer d=32 model and chain_sum."""
    out = tmp_path_factory.mktemp("variance")
    parser = argparse.ArgumentParser()
    vc.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(
        [
            "variance",
            "task_options={n_train: 40, n_test: 4}",
            "d_model=32",
            "n_layers=1",
            "n_heads=2",
            "ppots_sequences=2",
            "ppots_rates=4",
            "ppots_masks=2",
            "ppots_method=grid",
            f"output_dir={out / 'unused'}",
            "--methods=mirror,count,ppots,strats,ema,isad,clipped",
            "--sequences=6",
            "--rates=3",
            "--masks=2",
            "--grad-sequences=3",
            "--grad-rates=2",
            "--grad-masks=2",
            "--draws=4",
            "--batch=2",
            "--bootstrap=20",
            "--grid=4",
            "--grid-sequences=3",
            "--grid-masks=2",
            "--ema-warmup=8",
            "--project=16",
            "--seed=7",
            f"--output={out}",
        ]
    )
    assert vc.run_cli(args) == 0
    return out


def test_report_writes_every_output(report_dir):
    report = json.loads((report_dir / "variance.json").read_text())
    expected = {
        "config", "checkpoint", "options", "feature", "methods", "forward_passes",
        "decomposition", "arm", "curves", "comparison", "unstable", "heavy_tail_warning",
        "notes", "timing_s",
    }  # fmt: skip
    assert set(report) == expected
    assert report["config"]["seed"] == 7
    assert report["feature"]["projection"] == 16
    names = {"standard", "mirror", "count", "ppots", "strats", "ema", "isad", "clipped"}
    assert set(report["decomposition"]) == names
    assert report["decomposition"]["strats"] == {"same_as": "standard"}
    for name in names - {"strats"}:
        for what in ("loss", "grad"):
            components = report["decomposition"][name][what]
            assert {"A", "B", "C", "total", "se_A", "unstable"} <= set(components)
            assert components["total"] == pytest.approx(
                components["A"] + components["B"] + components["C"]
            )
    assert math.isfinite(report["decomposition"]["standard"]["semi_analytic_total"])
    assert report["decomposition"]["mirror"]["semi_analytic_total"] is None
    assert report["forward_passes"]["mirror"] == 2 * report["forward_passes"]["standard"] == 4
    for what in ("loss", "grad"):
        rows = report["comparison"][what]
        assert {row["name"] for row in rows} == names
        assert {"variance", "se", "variance_x_passes", "ratio_to_reference"} <= set(rows[0])
    curves = report["curves"]
    assert len(curves["t"]) == len(curves["S"]) == len(curves["a"]) == len(curves["b"]) == 4
    markdown = (report_dir / "variance.md").read_text()
    for heading in ("## Decomposition", "## Equal-compute comparison", "## Per-rate curves"):
        assert heading in markdown
    candidates = report["comparison"]["recommendation"]["candidates"]
    assert "clipped" not in candidates and "mirror" in candidates  # never the biased Clipped
    assert markdown.rstrip().splitlines()[-1].startswith("Recommendation: ")
    for name in PLOTS:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arm_has_no_mask_or_rate_noise(report_dir):
    """The ARM goes through the same nested design: its loss draws no rate and no mask, so
    A and B must be 0 up to rounding, for the loss and for the gradient."""
    arm = json.loads((report_dir / "variance.json").read_text())["arm"]
    for what in ("loss", "grad"):
        c = arm[what]
        assert c["C"] > 0
        rounding = 1e-9 * abs(c["C"])
        assert abs(c["A"]) <= 4 * c["se_A"] + rounding
        assert abs(c["B"]) <= 4 * c["se_B"] + rounding


def test_every_output_names_each_estimators_batch_equivalent(report_dir):
    """variance.json, variance.md and the terminal give each method's batch equivalent:
    Standard's gradient variance per sequence forward pass over the method's, with its SE."""
    import io

    from rich.console import Console

    from stablemdm.variance.output import print_report

    report = json.loads((report_dir / "variance.json").read_text())
    equivalents = report["comparison"]["batch_equivalent"]
    rows = {row["name"]: row for row in report["comparison"]["grad"]}
    assert set(equivalents) == set(rows)
    standard = rows["standard"]["variance_x_passes"]
    for name, row in rows.items():
        entry = equivalents[name]
        assert entry["value"] == pytest.approx(standard / row["variance_x_passes"])
        assert entry["variance_per_sequence_pass"] == row["variance_x_passes"]
        assert entry["passes_per_sequence"] == (2 if name == "mirror" else 1)
        assert entry["se"] > 0 or name == "standard"
    assert equivalents["standard"] == {**equivalents["standard"], "value": 1.0, "se": 0.0}
    markdown = (report_dir / "variance.md").read_text()
    gradient = markdown.split("### Gradient")[-1].split("### Loss")[0]
    assert "| batch equivalent |" in gradient and "Above 1 it beats scaling the batch" in gradient
    assert "| ratio to standard |" in markdown.split("### Loss")[-1]
    stream = io.StringIO()
    print_report(report, Console(file=stream, width=200))
    assert "batch equivalent" in stream.getvalue()


# --- statistical properties on the toy model ------------------------------------------------


def test_comparison_ranks_count_mode_ahead_of_standard():
    """At equal compute count mode beats Standard (module docstring), and both measured
    minibatch variances agree with their closed forms within 5 SE."""
    data, c = toy_data(16)
    batch, draws = 4, 400
    objectives = {
        "standard": Objective(mask_token_id=MASK_ID, eps=EPS),
        "count": Objective(mask_token_id=MASK_ID, rate="count", eps=EPS),
    }
    result = vm.compare_methods(PositionTable(PROMPT + L), objectives, data, draws, batch, 0)
    rows = {row["name"]: row for row in result["loss"]}
    assert list(rows)[0] == "count"
    assert rows["count"]["ratio_to_reference"] - 1.0 > 4 * rows["count"]["ratio_se"]
    for name, truth in (("standard", standard_variance(c)), ("count", count_variance(c))):
        assert abs(rows[name]["variance"] - truth / batch) < 5 * rows[name]["se"], name
    recommendation = result["recommendation"]  # estimator=auto's first choice: the lowest
    assert recommendation["name"] == "count"
    assert recommendation["difference"] > 4 * recommendation["difference_se"]  # vs Standard


def count_gradient_equivalent() -> float:
    """Count mode's batch equivalent for the toy's gradient. Eligible position i owns the
    table row i, so the gradient is the vector of (m_i / (L p)) g_i (Standard) or
    (1{i in M} / k) g_i (count), with g_i = dc_i/d(row i): per row the variance is |g_i|^2
    (E_t[1 / p_mask] - 1) / L^2 against |g_i|^2 (H_L - 1) / L^2, whatever the g_i. So the
    ratio is (ln(1/eps) / (1 - eps) - 1) / (H_L - 1), about 1.25, where the loss's ratio
    (`standard_variance` / `count_variance`) is many times larger."""
    harmonic = sum(1.0 / k for k in range(1, L + 1))
    return (math.log(1.0 / EPS) / (1.0 - EPS) - 1.0) / (harmonic - 1.0)


def test_a_bigger_batch_is_no_better_estimator_per_sequence_pass():
    """Standard's gradient variance per sequence forward pass (var x passes) at batch 4 and at
    batch 8 agree within their SE, so Standard at 2B has batch equivalent 1 while its
    minibatch variance halves; count mode's batch equivalent matches its closed form."""
    data, _ = toy_data(16)
    model = PositionTable(PROMPT + L)
    objectives = {
        "standard": Objective(mask_token_id=MASK_ID, eps=EPS),
        "count": Objective(mask_token_id=MASK_ID, rate="count", eps=EPS),
    }
    feature = selection.GradientFeature(model, None, None, 0)
    per_pass = {}
    for batch in (4, 8):
        result = vm.compare_methods(model, objectives, data, 800, batch, batch, feature)
        row = next(r for r in result["grad"] if r["name"] == "standard")
        per_pass[batch] = (row["variance_x_passes"], row["se"] * row["forward_passes"])
        count = result["batch_equivalent"]["count"]
        assert abs(count["value"] - count_gradient_equivalent()) < 4 * count["se"], count
    (small, se_small), (large, se_large) = per_pass[4], per_pass[8]
    assert abs(small - large) < 3 * math.hypot(se_small, se_large), per_pass
    assert small / 4 > 1.5 * large / 8  # the minibatch variance itself does halve


def test_nested_design_recovers_rate_noise_of_an_importance_weighted_sampler():
    """With t ~ p (a two-bin P-POTS density d1 on [0, 1/2), d2 on [1/2, 1]) and weight 1/p,
    the toy has E_m[l | t] = c_bar / p(t), so B = c_bar^2 (int dt / p - 1) > 0, while
    A = int V(t) / p(t) dt with V(t) = (1 - p_mask) sum c^2 / (L^2 p_mask), and C = 0 for
    identical sequences. The K masks of a rate must share it for B to be identified."""
    data, c = toy_data(120)
    sampler = PPOTS([3.0, 1.0], mix=0.5)
    d1, d2 = (float(sampler.density(torch.tensor([t]))) for t in (0.25, 0.75))
    objective = Objective(mask_token_id=MASK_ID, eps=EPS, sampler=sampler)
    design = vm.Design(120, 6, 4)
    components = vm.decompose(
        PositionTable(PROMPT + L), objective, data, torch.arange(120), design, seed=1, tag="t"
    )

    def int_inv_p_mask(a: float, b: float) -> float:
        return math.log(p_mask(b) / p_mask(a)) / (1.0 - EPS)

    scale = float((c**2).sum()) / L**2
    A = scale * ((int_inv_p_mask(0, 0.5) - 0.5) / d1 + (int_inv_p_mask(0.5, 1) - 0.5) / d2)
    B = float(c.mean()) ** 2 * (0.5 / d1 + 0.5 / d2 - 1.0)
    for name, truth in (("A", A), ("B", B), ("C", 0.0)):
        estimate, se = getattr(components, name), getattr(components, f"se_{name}")
        assert abs(estimate - truth) < 5 * se, (name, estimate, truth, se)
    assert B > 5 * components.se_B  # the design resolves the rate noise


def test_rate_curves_integrands_match_the_toy():
    """On the toy, a(t) = Var_m(l | t) = (1 - p) sum c^2 / (L^2 p) and b(t) = 0 (the mean
    does not depend on t), within 5 SE at every grid rate."""
    data, c = toy_data(100)
    standard = Objective(mask_token_id=MASK_ID, eps=EPS)
    curves = vm.rate_curves(PositionTable(PROMPT + L), standard, data, torch.arange(100), 6, 8, 2)
    t = np.asarray(curves["t"])
    truth_a = (1.0 - p_mask(t)) * float((c**2).sum()) / (L**2 * p_mask(t))
    assert np.all(np.abs(np.asarray(curves["a"]) - truth_a) < 5 * np.asarray(curves["se_a"]))
    assert np.all(np.abs(np.asarray(curves["b"])) < 5 * np.asarray(curves["se_b"]))
    se_g = np.sqrt(np.asarray(curves["v"]) / (100 * 8))
    assert np.all(np.abs(np.asarray(curves["g"]) - float(c.mean())) < 5 * se_g)


def test_projection_is_reproducible_and_preserves_squared_norms_on_average(monkeypatch):
    """G has N(0, 1/P) entries, so E ||G v||^2 = ||v||^2; blocks kept in memory and blocks
    regenerated on every use give the same G."""
    model = PositionTable(PROMPT + L)
    monkeypatch.setattr(selection, "PROJECTION_CHUNK", 64)  # many blocks of 4 columns for P = 16
    v = torch.randn(3, model.table.numel(), generator=torch.Generator().manual_seed(0))
    cached = vm.GradientFeature(model, None, 16, seed=3)
    first = cached.reduce(v)
    assert torch.equal(cached.reduce(v), first)
    monkeypatch.setattr(selection, "PROJECTION_CACHE", 0)
    assert torch.equal(vm.GradientFeature(model, None, 16, seed=3).reduce(v), first)
    ratios = torch.stack(
        [
            vm.GradientFeature(model, None, 16, seed=s).reduce(v).pow(2).sum(1) / v.pow(2).sum(1)
            for s in range(200)
        ]
    ).flatten()  # [600]
    se = ratios.std() / math.sqrt(len(ratios))
    assert abs(ratios.mean() - 1.0) < 5 * se


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_design": vm.Design(1, 4, 4)}, "--sequences = 1: need at least 2 sequences"),
        ({"grad_design": vm.Design(4, 4, 1)}, "--grad-masks = 1: need at least 2 masks"),
        ({"methods": ("standard", "bogus")}, "unknown method.*'bogus'.*ppots_mirror"),
        ({"draws": 2}, "--draws"),
        ({"project": 0}, "--project"),
    ],
)
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        vr.VarianceOptions(**options)


def test_parameter_regex_that_matches_nothing_lists_names():
    with pytest.raises(ConfigError, match="matches no parameter.*table"):
        vm.GradientFeature(PositionTable(PROMPT + L), "^lm_head", None, seed=0)


def test_non_finite_observations_are_reported():
    data, _ = toy_data(4)
    model = PositionTable(PROMPT + L, fill=float("nan"))
    objective = Objective(mask_token_id=MASK_ID, eps=EPS)
    with pytest.raises(ConfigError, match="non-finite observation"):
        vm.decompose(model, objective, data, torch.arange(4), vm.Design(4, 2, 2), 0, "nan")


def test_arm_reference_from_a_trained_arm_checkpoint(tmp_path):
    """--arm-checkpoint measures a trained ARM's data noise; it has no A or B either."""
    from stablemdm.training.recipe import load_config
    from stablemdm.training.run import train

    small = ["task_options={n_train: 40, n_test: 4}", "d_model=32", "n_layers=1", "n_heads=2"]
    arm_dir = tmp_path / "arm"
    train(
        load_config(
            None,
            [
                *small,
                "objective=arm",
                "max_steps=2",
                "save_steps=2",
                "disable_tqdm=true",
                f"output_dir={arm_dir}",
            ],
        )
    )
    options = vr.VarianceOptions(
        methods=("standard",),
        loss_design=vm.Design(4, 2, 2),
        grad_design=vm.Design(3, 2, 2),
        draws=3,
        batch=2,
        project=8,
        bootstrap=0,
        grid=3,
        grid_sequences=3,
        grid_masks=2,
    )
    config = load_config(None, [*small, f"output_dir={tmp_path / 'unused'}"])
    own = vr.run_variance(config, options)
    trained = vr.run_variance(config, options, arm_checkpoint=arm_dir)
    for report in (own, trained):
        assert abs(report["arm"]["loss"]["A"]) < 1e-9 and abs(report["arm"]["loss"]["B"]) < 1e-9
    assert trained["arm"]["loss"]["C"] != own["arm"]["loss"]["C"]
    with pytest.raises(ConfigError, match="does not exist"):
        vr.run_variance(config, options, arm_checkpoint=tmp_path / "missing")


def _components_generator(rng: np.random.Generator, I: int, G: int, K: int) -> np.ndarray:
    """l_igk = 3 + c_i + b_g + a_igk with c ~ N(0, 4), a ~ N(0, 1) and b = +-1 over the grid
    rates (mean 0, variance exactly 1 on the grid): A = 1, B = 1, C = 4 `[I, G, K]`."""
    b = np.where(np.arange(G) % 2 == 0, 1.0, -1.0)
    c = rng.normal(0.0, 2.0, (I, 1, 1))
    return 3.0 + c + b[None, :, None] + rng.normal(0.0, 1.0, (I, G, K))


def test_per_rate_total_equals_a_plus_b_plus_c_and_is_unbiased():
    """The total uses an unbiased (E l)^2, which makes it equal A + B + C on every sample and
    unbiased for Var(l) = 6; the plug-in square of the mean is low by about C / I = 1."""
    rng = np.random.default_rng(0)
    totals, plug_ins = [], []
    for _ in range(2000):
        l = _components_generator(rng, 4, 4, 2)
        integrals = vm.curve_statistics(l)["integrals"]
        parts = integrals["A"] + integrals["B"] + integrals["C"]
        assert integrals["total"] == pytest.approx(parts, rel=1e-12, abs=1e-12)
        totals.append(integrals["total"])
        plug_ins.append(float((l**2).mean() - l.mean() ** 2))
    totals, plug_ins = np.array(totals), np.array(plug_ins)
    se = totals.std(ddof=1) / math.sqrt(len(totals))
    assert abs(totals.mean() - 6.0) < 5 * se
    assert plug_ins.mean() + 5 * plug_ins.std(ddof=1) / math.sqrt(len(plug_ins)) < 6.0


def test_semi_analytic_total_of_standard_is_the_per_rate_total():
    l = _components_generator(np.random.default_rng(1), 6, 4, 3)
    curves = {"t": ((np.arange(4) + 0.5) / 4).tolist(), **vm.curve_statistics(l)}
    assert vm.semi_analytic_total(curves, Uniform()) == pytest.approx(
        curves["integrals"]["total"], rel=1e-12
    )
