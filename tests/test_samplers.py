"""Tests for the rate samplers (paper.md section 3): the sampling contract, the schemes,
EMA adaptation, count mode, state and validation. Monte Carlo checks use fixed seeds and a
5-standard-error tolerance computed from the sample itself."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from stablemdm.estimators.counts import count_probabilities, sample_counts
from stablemdm.estimators.ema import EMA
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.rates import (
    Clipped,
    PiecewiseDensity,
    RateSampler,
    Uniform,
    sqrt_edges,
)
from stablemdm.estimators.registry import SAMPLERS, make_sampler, with_scheme
from stablemdm.estimators.stratified import Stratified
from stablemdm.estimators.syrm import Mirrored

Z = 5.0  # tolerance in standard errors
STEEP_EPS = 1e-3

# test integrands f on (0, 1] and their exact integrals
FUNCTIONS = {
    "steep": (
        lambda t: torch.where(t >= STEEP_EPS, 1.0 / t, torch.zeros_like(t)),
        -math.log(STEEP_EPS),
    ),
    "poly": (lambda t: 3 * t**2 - t + 0.5, 1.0),
    "step": (lambda t: (t > 0.3).double(), 0.7),
}

# P-POTS shapes: decreasing, increasing, and zero on the middle (kept positive by the mix)
SHAPES = {
    "decreasing": lambda t: 1.0 / (t + 0.05),
    "increasing": lambda t: 2.718281828 ** (3 * t),
    "two_ends": lambda t: ((t < 0.2) | (t > 0.8)).astype(float),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def refreshed_ema() -> EMA:
    """An EMA sampler that has learned a decreasing density from a few observed steps."""
    ema = EMA(n_bins=20, decay=0.9, refresh_every=5, mix=0.1)
    g = gen(123)
    for _ in range(5):
        t, _ = ema.sample(64, g)
        loss = 2.0 / (t + 0.1) + torch.randn(64, generator=g, dtype=torch.float64) / (t + 0.1)
        ema.observe(t, loss)
        ema.step()
    return ema


IID_SAMPLERS = {
    "uniform": Uniform,
    **{
        f"ppots_{k}": (lambda fn=fn: PPOTS.from_function(fn, n_bins=64, mix=0.05))
        for k, fn in SHAPES.items()
    },
    "ema": refreshed_ema,
}
SCHEME_SAMPLERS = {
    "strats_uniform": lambda: Stratified(Uniform()),
    "strats_ppots": lambda: Stratified(PPOTS.from_function(SHAPES["decreasing"], n_bins=64)),
    "syrm_uniform": lambda: Mirrored(Uniform()),
    "syrm_ppots": lambda: Mirrored(PPOTS.from_function(SHAPES["increasing"], n_bins=64)),
}
DENSITIES = {**IID_SAMPLERS, "clipped": lambda: Clipped(0.25, 0.75)}


def assert_within(mean: float, se: float, truth: float, what: str) -> None:
    assert abs(mean - truth) < Z * se, f"{what}: {mean:.5f} vs {truth:.5f} (SE {se:.2e})"


class TestContract:
    @pytest.mark.parametrize("name", IID_SAMPLERS)
    def test_unbiased_iid(self, name):
        sampler = IID_SAMPLERS[name]()
        t, w = sampler.sample(200_000, gen(1))
        for fname, (f, truth) in FUNCTIONS.items():
            x = w * f(t)
            assert_within(
                x.mean().item(), x.std().item() / math.sqrt(len(x)), truth, f"{name}/{fname}"
            )

    @pytest.mark.parametrize("name", SCHEME_SAMPLERS)
    def test_unbiased_schemes(self, name):
        """Draws within one batch are dependent: each batch mean is one replicate."""
        sampler, g = SCHEME_SAMPLERS[name](), gen(2)
        n = 63  # odd: Mirrored leaves the last draw unpaired
        batches = [sampler.sample(n, g) for _ in range(2000)]
        for fname, (f, truth) in FUNCTIONS.items():
            means = torch.stack([(w * f(t)).mean() for t, w in batches])  # [R]
            se = means.std().item() / math.sqrt(len(means))
            assert_within(means.mean().item(), se, truth, f"{name}/{fname}")

    @pytest.mark.parametrize("name", DENSITIES)
    def test_density_integrates_to_one(self, name):
        """The midpoint rule is exact for piecewise-constant densities whose breakpoints are
        cell edges: the cells are a fine grid refined by the sampler's own bin edges."""
        sampler = DENSITIES[name]()
        own = getattr(sampler, "edges", torch.tensor([0.25, 0.75], dtype=torch.float64))
        edges = torch.unique(torch.cat([torch.linspace(0, 1, 4001, dtype=torch.float64), own]))
        t = 0.5 * (edges[1:] + edges[:-1])  # [cells]
        integral = (sampler.density(t) * torch.diff(edges)).sum().item()
        assert integral == pytest.approx(1.0, abs=1e-12)
        assert sampler.cdf(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]

    @pytest.mark.parametrize("name", DENSITIES)
    def test_cdf_icdf_inverse(self, name):
        sampler = DENSITIES[name]()
        u = torch.rand(10_000, generator=gen(3), dtype=torch.float64)
        torch.testing.assert_close(sampler.cdf(sampler.icdf(u)), u, rtol=0, atol=1e-12)
        if name != "clipped":  # the others have positive density everywhere
            torch.testing.assert_close(sampler.icdf(sampler.cdf(u)), u, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("name", IID_SAMPLERS)
    def test_t_in_unit_interval_and_weight_is_inverse_density(self, name):
        sampler = IID_SAMPLERS[name]()
        t, w = sampler.sample(50_000, gen(4))
        assert t.dtype == w.dtype == torch.float64 and t.shape == w.shape == (50_000,)
        assert (t > 0).all() and (t <= 1).all()
        torch.testing.assert_close(w, 1.0 / sampler.density(t), rtol=0, atol=0)
        if isinstance(sampler, PiecewiseDensity):
            assert w.max().item() <= (1.0 / sampler.mix) * (1 + 1e-12)

    def test_extreme_uniforms_give_t_in_unit_interval(self):
        class Extremes(PPOTS):
            def uniforms(self, n, generator):
                return torch.tensor([0.0, 1.0], dtype=torch.float64)

        sampler = Extremes(torch.ones(4))
        t, w = sampler.sample(2, gen())
        assert 0 < t[0] < 1e-9 and t[1] == 1.0 and torch.isfinite(w).all()


class TestSchemes:
    @pytest.mark.parametrize("n", [1, 7, 64])
    def test_stratified_one_draw_per_stratum(self, n):
        base = PPOTS.from_function(SHAPES["decreasing"], n_bins=64)
        sampler, g = Stratified(base), gen(5)
        u = sampler.uniforms(n, g)
        assert sorted(torch.floor(u * n).long().tolist()) == list(range(n))
        t, _ = sampler.sample(n, g)
        assert sorted(torch.floor(base.cdf(t) * n).long().tolist()) == list(range(n))

    def test_stratified_order_is_random(self):
        u = Stratified().uniforms(64, gen(6))
        assert torch.floor(u * 64).long().tolist() != list(range(64))

    def test_mirrored_pairs_sum_to_one_in_cdf_space(self):
        base = PPOTS.from_function(SHAPES["increasing"], n_bins=64)
        sampler = Mirrored(base)
        t, _ = sampler.sample(11, gen(7))
        c = base.cdf(t)  # [11]
        torch.testing.assert_close(c[0:10:2] + c[1:10:2], torch.ones(5, dtype=torch.float64))
        assert 0 < t[10] <= 1

    def test_schemes_delegate_to_base(self):
        base = PPOTS.from_function(SHAPES["decreasing"], n_bins=64)
        t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
        for wrapped in (Stratified(base), Mirrored(base), with_scheme(base, "stratified")):
            assert wrapped.base is base and wrapped.unbiased
            torch.testing.assert_close(wrapped.density(t), base.density(t))
            assert wrapped.state_dict().keys() == base.state_dict().keys()
        assert with_scheme(base, "iid") is base
        assert isinstance(with_scheme(base, "mirrored"), Mirrored)
        assert not with_scheme(Clipped(0.2, 0.8), "stratified").unbiased

    def test_nested_schemes_are_rejected(self):
        with pytest.raises(ValueError, match="one sampler has one"):
            Stratified(Mirrored(Uniform()))
        with pytest.raises(ValueError, match="already has a uniform scheme"):
            with_scheme(Stratified(), "mirrored")

    def test_schemes_forward_observe_and_step_to_ema(self):
        ema = EMA(n_bins=4, refresh_every=1)
        wrapped = Stratified(ema)
        wrapped.observe(torch.tensor([0.1, 0.9]), torch.tensor([4.0, 1.0]))
        wrapped.step()
        assert ema.steps == 1 and ema.heights[0] > ema.heights[3]


class TestClipped:
    def test_draws_stay_in_interval_with_unit_weight(self):
        sampler = Clipped(0.2, 0.8)
        t, w = sampler.sample(10_000, gen(8))
        assert (t >= 0.2).all() and (t <= 0.8).all() and (w == 1).all()
        assert sampler.unbiased is False

    def test_zero_low_still_gives_positive_t(self):
        t, _ = Clipped(0.0, 0.5).sample(10_000, gen(9))
        assert (t > 0).all() and (t <= 0.5).all()

    @pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.2, 1.5)])
    def test_bad_interval(self, low, high):
        with pytest.raises(ValueError, match="0 <= low < high <= 1"):
            Clipped(low, high)


class TestEMA:
    # EMA(n_bins=4) has the edges (j/4)^2 = 0, 0.0625, 0.25, 0.5625, 1
    def test_bins_are_equal_in_sqrt_t(self):
        ema = EMA(n_bins=4)
        torch.testing.assert_close(ema.edges, sqrt_edges(4))
        t = torch.tensor([0.01, 0.1, 0.3, 0.9], dtype=torch.float64)
        assert ema._bin(t).tolist() == [0, 1, 2, 3]
        assert EMA().edges[1].item() == pytest.approx(0.0025)  # the first of 20 bins: t < 1/400

    def test_uniform_before_any_observation(self):
        ema = EMA(n_bins=5)
        ema.refresh()
        t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
        torch.testing.assert_close(ema.density(t), torch.ones_like(t))

    def test_moments_follow_the_ema_formula_once_per_step(self):
        """Draws of one step (several micro-batches) are pooled, then decayed once."""
        ema = EMA(n_bins=4, decay=0.75)
        ema.observe(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 3.0]))
        ema.observe(torch.tensor([0.6]), torch.tensor([2.0]))  # a second micro-batch
        assert ema.counts.tolist() == [0, 0, 0, 0]  # nothing folded before the step ends
        ema.step()
        expected = torch.tensor([0.0, 5.0, 0.0, 4.0], dtype=torch.float64)  # first: set
        torch.testing.assert_close(ema.moments, expected)
        ema.observe(torch.tensor([0.15]), torch.tensor([1.0]))
        ema.observe(torch.tensor([0.16]), torch.tensor([3.0]))
        ema.step()
        expected[1] = 0.75 * 5.0 + 0.25 * (1.0 + 9.0) / 2  # one decay for the step's mean
        torch.testing.assert_close(ema.moments, expected)
        assert ema.counts.tolist() == [0, 4, 0, 1]

    def test_refresh_uses_sqrt_moment_and_fills_unseen_bins(self):
        ema = EMA(n_bins=4, mix=0.2)
        ema.observe(torch.tensor([0.1, 0.6]), torch.tensor([4.0, 2.0]))
        ema.refresh()  # folds what was observed first
        h = torch.tensor([3.0, 4.0, 3.0, 2.0], dtype=torch.float64)  # unseen bins: mean of 4, 2
        h = h / (h * torch.diff(sqrt_edges(4))).sum()
        torch.testing.assert_close(ema.heights, h)
        t = torch.tensor([0.01, 0.1, 0.3, 0.9], dtype=torch.float64)
        torch.testing.assert_close(ema.density(t), 0.2 + 0.8 * h)

    def test_refreshes_every_n_steps(self):
        ema = EMA(n_bins=4, refresh_every=3)
        ema.observe(torch.tensor([0.1, 0.4]), torch.tensor([5.0, 1.0]))
        ema.step()
        ema.step()
        assert torch.equal(ema.heights, torch.ones(4, dtype=torch.float64))
        ema.step()
        assert ema.heights[1] > ema.heights[2]

    def test_unbiased_through_refreshes(self):
        """Each step's weighted mean is unbiased given the past, so their average is too."""
        ema, g = EMA(n_bins=10, decay=0.5, refresh_every=3, mix=0.1), gen(10)
        means = {name: [] for name in FUNCTIONS}
        for _ in range(600):
            t, w = ema.sample(64, g)
            for name, (f, _) in FUNCTIONS.items():
                means[name].append((w * f(t)).mean())
            ema.observe(t, 1.0 / (t + 0.05) + torch.randn(64, generator=g, dtype=torch.float64))
            ema.step()
        assert ema.heights[0] > 3 * ema.heights[-1]  # it did adapt
        for name, (_, truth) in FUNCTIONS.items():
            m = torch.stack(means[name])
            assert_within(m.mean().item(), m.std().item() / math.sqrt(len(m)), truth, name)

    def test_nonfinite_loss_is_rejected(self):
        with pytest.raises(ValueError, match="not finite"):
            EMA().observe(torch.tensor([0.5]), torch.tensor([float("nan")]))

    @pytest.mark.parametrize(
        "options, match",
        [
            ({"n_bins": 0}, "n_bins"),
            ({"refresh_every": 0}, "refresh_every"),
            ({"decay": 1.0}, "decay"),
            ({"mix": 0.0}, r"outside \(0, 1\]"),
        ],
    )
    def test_bad_options(self, options, match):
        with pytest.raises(ValueError, match=match):
            EMA(**options)


def draws_after_roundtrip(original: RateSampler, fresh: RateSampler, through_bytes: bool = False):
    state = original.state_dict()
    if through_bytes:  # what a checkpoint does
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)
    fresh.load_state_dict(state)
    return original.sample(100, gen(11)), fresh.sample(100, gen(11))


class TestState:
    def test_ema_round_trip(self):
        ema = refreshed_ema()
        ema.observe(torch.tensor([0.3, 0.7]), torch.tensor([1.0, 2.0]))
        fresh = EMA(n_bins=20, decay=0.9, refresh_every=5, mix=0.1)
        (t1, w1), (t2, w2) = draws_after_roundtrip(ema, fresh, through_bytes=True)
        assert torch.equal(t1, t2) and torch.equal(w1, w2)
        assert torch.equal(ema.moments, fresh.moments) and ema.steps == fresh.steps
        for s in (ema, fresh):
            s.observe(t1, 1.0 / t1)
            for _ in range(5):
                s.step()
        assert torch.equal(ema.heights, fresh.heights)

    def test_ema_state_for_other_options_is_rejected(self):
        with pytest.raises(ValueError, match="bins"):
            EMA(n_bins=7).load_state_dict(refreshed_ema().state_dict())

    def test_ppots_and_wrapped_round_trip(self):
        ppots = PPOTS.from_function(SHAPES["two_ends"], n_bins=32, source={"method": "test"})
        fresh = PPOTS(torch.ones(3))
        (t1, w1), (t2, w2) = draws_after_roundtrip(ppots, fresh, through_bytes=True)
        assert torch.equal(t1, t2) and torch.equal(w1, w2) and fresh.source == {"method": "test"}
        wrapped, fresh_wrapped = Stratified(ppots), Stratified(PPOTS(torch.ones(3)))
        (t1, _), (t2, _) = draws_after_roundtrip(wrapped, fresh_wrapped)
        assert torch.equal(t1, t2)

    def test_ppots_dict_round_trip_through_json(self):
        ppots = PPOTS.from_function(SHAPES["decreasing"], n_bins=50, mix=0.07, source={"m": "x"})
        loaded = PPOTS.from_dict(json.loads(json.dumps(ppots.to_dict())))
        assert torch.equal(loaded.heights, ppots.heights) and loaded.mix == 0.07
        assert loaded.source == {"m": "x"}
        assert torch.equal(loaded.sample(50, gen(12))[0], ppots.sample(50, gen(12))[0])

    @pytest.mark.parametrize(
        "change, match",
        [
            (lambda d: d.update(heights=[h * 1.01 for h in d["heights"]]), "integrates to"),
            (lambda d: d.pop("mix"), "missing keys"),
            (lambda d: d.update(extra=1), "unknown keys"),
            (lambda d: d.update(heights=[]), "at least one bin"),
            (lambda d: d.update(heights="abc"), "list of numbers"),
            (lambda d: d.update(heights=[2.0, 0.0, -0.5, 0.5]), ">= 0"),
            (lambda d: d.update(mix=1.5), r"outside \(0, 1\]"),
            (lambda d: d.update(source=[1]), "source"),
        ],
    )
    def test_from_dict_errors(self, change, match):
        data = PPOTS.from_function(SHAPES["decreasing"], n_bins=4).to_dict()
        change(data)
        with pytest.raises(ValueError, match=match):
            PPOTS.from_dict(data)

    def test_ppots_dict_keeps_edges_and_check(self):
        ppots = PPOTS.from_function(SHAPES["decreasing"], n_bins=16, mix=0.1)
        ppots.check = {"ratio_to_standard": 0.7, "fallback": False}
        data = json.loads(json.dumps(ppots.to_dict()))
        loaded = PPOTS.from_dict(data)
        assert torch.equal(loaded.edges, sqrt_edges(16)) and loaded.check == ppots.check
        assert torch.equal(loaded.sample(50, gen(13))[0], ppots.sample(50, gen(13))[0])

    def test_old_file_without_edges_or_check_loads_with_equal_bins(self):
        old = {"heights": [0.5, 1.5], "mix": 0.1, "source": {"method": "family"}}
        loaded = PPOTS.from_dict(old)
        assert loaded.edges.tolist() == [0.0, 0.5, 1.0] and loaded.check is None
        assert loaded.density(torch.tensor([0.25, 0.75])).tolist() == pytest.approx(
            [0.1 + 0.9 * 0.5, 0.1 + 0.9 * 1.5]
        )

    @pytest.mark.parametrize(
        "edges, match",
        [([0.0, 0.5, 1.0], "need 5 edges"), ([0.0, 0.3, 0.2, 0.6, 1.0], "increase strictly")],
    )
    def test_bad_edges(self, edges, match):
        data = PPOTS.from_function(SHAPES["decreasing"], n_bins=4).to_dict()
        data["edges"] = edges
        with pytest.raises(ValueError, match=match):
            PPOTS.from_dict(data)

    def test_uniform_fallback_has_unit_weights(self):
        sampler = PPOTS.uniform(source={"fallback": True})
        t, w = sampler.sample(1000, gen(14))
        assert (w == 1).all() and sampler.source == {"fallback": True}
        torch.testing.assert_close(sampler.cdf(t), t)

    def test_ema_pending_draws_survive_a_round_trip(self):
        ema, fresh = EMA(n_bins=4, refresh_every=1), EMA(n_bins=4, refresh_every=1)
        ema.observe(torch.tensor([0.1, 0.9]), torch.tensor([4.0, 1.0]))
        fresh.load_state_dict(ema.state_dict())
        for s in (ema, fresh):
            s.step()
        assert torch.equal(ema.heights, fresh.heights) and torch.equal(ema.moments, fresh.moments)

    def test_ema_state_with_equal_bins_is_rejected(self):
        state = EMA(n_bins=4).state_dict()
        state.pop("edges")  # as written before the bins were equal in sqrt(t)
        with pytest.raises(ValueError, match="older stablemdm with equal bins"):
            EMA(n_bins=4).load_state_dict(state)

    def test_from_dict_rejects_a_non_dict(self):
        with pytest.raises(ValueError, match="expected a dict"):
            PPOTS.from_dict([1, 2])


class TestFactory:
    def test_registry_names(self):
        assert set(SAMPLERS) == {
            "uniform",
            "clipped",
            "ppots",
            "ema",
            "strats",
            "strats_rows",
            "syrm",
        }
        for name, cls in SAMPLERS.items():
            assert cls.name == name

    def test_make_sampler(self):
        assert isinstance(make_sampler("uniform"), Uniform)
        assert make_sampler("clipped", low=0.1, high=0.9).high == 0.9
        assert make_sampler("ema", n_bins=8).n_bins == 8
        ppots = PPOTS.from_function(SHAPES["decreasing"], n_bins=8)
        assert make_sampler("strats", base=ppots).base is ppots
        assert isinstance(make_sampler("syrm").base, Uniform)
        assert torch.equal(make_sampler("ppots", **ppots.to_dict()).heights, ppots.heights)

    def test_unknown_name_lists_valid_names(self):
        with pytest.raises(
            ValueError, match="valid names: clipped, ema, ppots, strats, strats_rows, syrm, uniform"
        ):
            make_sampler("antithetic")

    def test_unknown_and_missing_options(self):
        with pytest.raises(ValueError, match=r"no option\(s\) \['bins'\]"):
            make_sampler("ema", bins=3)
        with pytest.raises(ValueError, match=r"needs option\(s\) \['low', 'high'\]"):
            make_sampler("clipped")

    def test_unknown_scheme_lists_schemes(self):
        with pytest.raises(
            ValueError, match="valid schemes: iid, stratified, stratified_rows, mirrored"
        ):
            with_scheme(Uniform(), "antithetic")

    @pytest.mark.parametrize("mix", [0.0, -0.1, 1.5, float("nan")])
    def test_mix_outside_unit_interval(self, mix):
        with pytest.raises(ValueError, match=r"lambda\) = .* is outside \(0, 1\]"):
            PiecewiseDensity([1.0, 2.0], mix)

    @pytest.mark.parametrize("heights", [[0.0, 0.0], [1.0, float("inf")], [[1.0]]])
    def test_bad_heights(self, heights):
        with pytest.raises(ValueError, match="heights"):
            PiecewiseDensity(heights, 0.1)

    def test_explicit_generator_required(self):
        with pytest.raises(TypeError, match="explicit torch.Generator"):
            Uniform().sample(3, None)


COUNT_SAMPLERS = {
    "uniform": Uniform,
    **{
        f"ppots_{k}": (lambda fn=fn: PPOTS.from_function(fn, n_bins=64, mix=0.05))
        for k, fn in SHAPES.items()
    },
    "ema": refreshed_ema,
}
COUNT_FUNCTIONS = {
    "k": lambda k, L: k,
    "k_squared": lambda k, L: k**2,
    "inverse": lambda k, L: 1.0 / k,
    "top_third": lambda k, L: (k > L / 3).double(),
}


class TestCounts:
    @pytest.mark.parametrize("name", COUNT_SAMPLERS)
    @pytest.mark.parametrize("L", [1, 2, 7, 50])
    def test_exact_enumeration(self, name, L):
        """E[weight g(k)] = sum_k q(k) / (L q(k)) g(k) = (1/L) sum_k g(k) once q is a
        positive distribution on 1..L."""
        sampler = COUNT_SAMPLERS[name]()
        q = count_probabilities(sampler, L)  # [L]
        assert (q > 0).all() and q.sum().item() == pytest.approx(1.0, abs=1e-12)
        k = torch.arange(1, L + 1, dtype=torch.float64)
        for g in COUNT_FUNCTIONS.values():
            value = (q * (1.0 / (L * q)) * g(k, L)).sum().item()
            assert value == pytest.approx(g(k, L).mean().item(), rel=1e-12)

    def test_uniform_counts_are_uniform_with_unit_weight(self):
        q = count_probabilities(Uniform(), 9)
        torch.testing.assert_close(q, torch.full((9,), 1 / 9, dtype=torch.float64))
        _, w = sample_counts(Uniform(), torch.full((100,), 9), gen(13))
        torch.testing.assert_close(w, torch.ones(100, dtype=torch.float64))

    @pytest.mark.parametrize("name", COUNT_SAMPLERS)
    def test_sample_counts_frequencies_and_weights(self, name):
        sampler, L, n = COUNT_SAMPLERS[name](), 7, 50_000
        k, w = sample_counts(sampler, torch.full((n,), L), gen(14))
        assert k.dtype == torch.long and k.min() >= 1 and k.max() <= L
        q = count_probabilities(sampler, L)  # [L]
        torch.testing.assert_close(w, 1.0 / (L * q[k - 1]))
        freq = torch.bincount(k - 1, minlength=L).double() / n
        se = (q * (1 - q) / n).sqrt()
        assert ((freq - q).abs() < Z * se).all(), (freq, q)

    @pytest.mark.parametrize("name", ["uniform", "ppots_decreasing", "ppots_two_ends", "ema"])
    def test_sample_counts_unbiased_with_mixed_lengths(self, name):
        sampler, g = COUNT_SAMPLERS[name](), gen(15)
        L = torch.randint(1, 40, (100_000,), generator=g)  # [B]
        k, w = sample_counts(sampler, L, g)
        for fname, fn in COUNT_FUNCTIONS.items():
            truth = torch.stack([fn(torch.arange(1, l + 1.0), l).mean() for l in range(1, 40)])
            target = truth[L - 1].double().mean().item()  # average over the batch's lengths
            x = w * fn(k.double(), L)
            assert_within(x.mean().item(), x.std().item() / math.sqrt(len(x)), target, fname)

    def test_stratified_counts_cover_every_count(self):
        L = 32
        k, _ = sample_counts(Stratified(), torch.full((L,), L), gen(16))
        assert sorted(k.tolist()) == list(range(1, L + 1))

    def test_mirrored_counts_are_antithetic(self):
        L = 20
        k, _ = sample_counts(Mirrored(), torch.full((40,), L), gen(17))
        assert (k[0::2] + k[1::2] == L + 1).all()  # ceil(L r) + ceil(L (1 - r)) = L + 1

    def test_clipped_counts_stay_biased_with_unit_weight(self):
        L = 50
        k, w = sample_counts(Clipped(0.2, 0.6), torch.full((5000,), L), gen(18))
        assert (w == 1).all() and k.min() >= 10 and k.max() <= 30

    def test_no_eligible_tokens_is_an_error(self):
        with pytest.raises(ValueError, match="at least one eligible token"):
            sample_counts(Uniform(), torch.tensor([3, 0]), gen())
