"""Tests for estimating and fitting the P-POTS density (paper.md section 3): the grid second
moment, the smooth family and its KL fit, the smoothed grid density, the variance theory,
and the variance reduction P-POTS achieves against it (Monte Carlo, 5 standard errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stablemdm.estimators import ppots_fit as ppots
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.rates import Uniform, sqrt_edges

Z = 5.0  # tolerance in standard errors
GRID = np.arange(1, 70) / 69  # 69 rates as in the authors' estimate, ending at t = 1
TRUE_FAMILIES = {
    "rising": ppots.FamilyParams(a=2.0, b=0.5, A=0.3, r=2.0, q=3.0, k=1.5, m=2.0),
    "falling": ppots.FamilyParams(a=0.2, b=4.0, A=0.5, r=1.0, q=6.0, k=0.3, m=1.0),
}


def normalised(fn, t: np.ndarray) -> np.ndarray:
    """fn on an evenly spaced t, divided by its mean there (a density on that range)."""
    values = fn(t)
    return values / values.mean()


class TestSecondMoment:
    def test_mean_of_squares_over_sequences_and_masks(self):
        losses = np.array([[[1.0, 3.0], [0.0, 2.0]], [[2.0, 2.0], [4.0, 0.0]]])  # [I=2, J=2, K=2]
        np.testing.assert_allclose(ppots.second_moment(losses), [(1 + 9 + 4 + 4) / 4, (4 + 16) / 4])

    def test_includes_between_sequence_spread(self):
        """Sequences with constant losses 1 and 3 at a rate: S = (1 + 9)/2, not ((1 + 3)/2)^2."""
        losses = torch.tensor([[[1.0, 1.0]], [[3.0, 3.0]]])  # [2, 1, 2]
        np.testing.assert_allclose(ppots.second_moment(losses), [5.0])

    @pytest.mark.parametrize(
        "losses, match",
        [(np.ones((2, 3)), "sequences, rates, masks"), (np.full((1, 2, 1), np.nan), "NaN")],
    )
    def test_bad_input(self, losses, match):
        with pytest.raises(ValueError, match=match):
            ppots.second_moment(losses)


class TestFamily:
    def test_density_formula(self):
        p = TRUE_FAMILIES["rising"]
        t = np.array([0.0, 0.3, 1.0])
        expected = np.sqrt(p.a * t**p.r + p.b * (1 - t) ** p.q + (p.A * np.exp(p.k * t**p.m)) ** 2)
        np.testing.assert_allclose(ppots.family_density(t, p), expected, rtol=1e-15)

    def test_params_dict_round_trip_and_validation(self):
        p = TRUE_FAMILIES["falling"]
        assert ppots.FamilyParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
        with pytest.raises(ValueError, match="exactly the fields"):
            ppots.FamilyParams.from_dict({"a": 1.0})
        with pytest.raises(ValueError, match="r, q, m >= 1"):
            ppots.FamilyParams(1.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0)

    def test_kl_gradient_matches_central_differences(self):
        """Central differences with h = 1e-6 err by O(h^2 f''') + O(eps |f| / h) < 1e-9."""
        noise = np.exp(np.random.default_rng(0).normal(0, 0.3, GRID.size))
        S = ppots.family_density(GRID, TRUE_FAMILIES["rising"]) ** 2 * noise
        args = ppots._kl_inputs(GRID, S)
        x = np.array([0.1, -0.3, 0.2, 2.5, 1.7, 1.1, 2.2])
        _, grad = ppots._family_kl(x, *args)
        h = 1e-6
        numeric = [
            (ppots._family_kl(x + h * e, *args)[0] - ppots._family_kl(x - h * e, *args)[0])
            / (2 * h)
            for e in np.eye(7)
        ]
        np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-9)

    @pytest.mark.parametrize("name", TRUE_FAMILIES)
    def test_fit_recovers_known_density(self, name):
        """With S exactly in the family the minimum KL is 0. KL ~ E_pi[eps^2] / 2 for a relative
        error eps, so KL < 1e-9 means an RMS error ~ 4e-5 on the grid; a max relative error
        of 1e-3 between and at the grid points leaves a factor ~25 for the worst point."""
        true = TRUE_FAMILIES[name]
        S = ppots.family_density(GRID, true) ** 2
        fit = ppots.fit_family(GRID, S)
        assert ppots.family_kl(GRID, S, fit) < 1e-9
        t = np.linspace(GRID[0], 1.0, 4001)
        rel = normalised(lambda x: ppots.family_density(x, fit), t) / normalised(
            lambda x: ppots.family_density(x, true), t
        )
        assert np.max(np.abs(rel - 1)) < 1e-3

    def test_fit_on_noisy_estimate_beats_the_truth(self):
        """The fit minimises the grid KL, so it must do at least as well as the true params."""
        true = TRUE_FAMILIES["rising"]
        noise = np.exp(np.random.default_rng(1).normal(0, 0.2, GRID.size))
        S = ppots.family_density(GRID, true) ** 2 * noise
        fit = ppots.fit_family(GRID, S, n_starts=4, seed=3)
        assert ppots.family_kl(GRID, S, fit) <= ppots.family_kl(GRID, S, true) + 1e-12

    @pytest.mark.parametrize(
        "grid, S, match",
        [
            (np.array([0.5, 0.2]), np.ones(2), "strictly increasing"),
            (np.array([0.0, 0.5]), np.ones(2), r"\(0, 1\]"),
            (np.array([0.2, 0.5]), np.array([1.0, -1.0]), ">= 0"),
            (np.array([0.2, 0.5]), np.zeros(2), "at least one positive"),
            (np.array([0.5]), np.ones(1), "length >= 2"),
        ],
    )
    def test_bad_grid(self, grid, S, match):
        with pytest.raises(ValueError, match=match):
            ppots.fit_family(grid, S)


class TestSmoothedGrid:
    def test_constant_stays_constant(self):
        fn = ppots.smoothed_grid_density(GRID, np.full(GRID.size, 4.0))
        np.testing.assert_allclose(fn(np.linspace(1e-6, 1, 101)), 2.0, rtol=1e-12)

    def test_linear_root_is_reproduced_in_the_interior(self):
        """For linear sqrt(S) on an even grid Nadaraya-Watson is unbiased up to the boundary
        leak exp(-(0.2/h)^2/2) = exp(-8) ~ 3e-4 at distance 0.2 = 4 bandwidths."""
        fn = ppots.smoothed_grid_density(GRID, (1 + 3 * GRID) ** 2, bandwidth=0.05)
        t = np.linspace(0.2, 0.8, 61)
        np.testing.assert_allclose(fn(t), 1 + 3 * t, rtol=1e-3)

    def test_strictly_positive_with_zero_estimates(self):
        S = np.where(GRID > 0.5, 1.0, 0.0)
        fn = ppots.smoothed_grid_density(GRID, S, bandwidth=0.02)
        assert (fn(np.linspace(1e-9, 1, 1001)) > 0).all()

    def test_bad_bandwidth(self):
        with pytest.raises(ValueError, match="bandwidth"):
            ppots.smoothed_grid_density(GRID, np.ones(GRID.size), bandwidth=0.0)


class TestTheory:
    def test_optimal_ratio_closed_forms(self):
        assert ppots.optimal_variance_ratio(lambda t: np.full_like(t, 3.0)) == pytest.approx(1.0)
        # (int t)^2 / int t^2 = (1/4) / (1/3); the midpoint rule errs by O(1/n^2)
        assert ppots.optimal_variance_ratio(lambda t: t**2) == pytest.approx(0.75, abs=1e-6)

    def test_importance_second_moment(self):
        def S(t):
            return (1 + t) ** 2

        uniform = ppots.importance_second_moment(S, np.ones_like)
        assert uniform == pytest.approx(7 / 3, abs=1e-6)  # int (1 + t)^2
        optimal = ppots.importance_second_moment(S, lambda t: (1 + t) / 1.5)
        assert optimal == pytest.approx(1.5**2, abs=1e-6)  # (int sqrt S)^2
        assert optimal / uniform == pytest.approx(ppots.optimal_variance_ratio(S), abs=1e-6)


def variance_ratio_se(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Var(x)/Var(y) for independent samples and its delta-method SE:
    Var(s^2) ~ (m4 - s^4)/n, so (SE/ratio)^2 ~ (kurt_x - 1)/n_x + (kurt_y - 1)/n_y."""

    def var_and_rel2(v: torch.Tensor) -> tuple[float, float]:
        c = v - v.mean()
        s2 = (c**2).mean().item()
        return s2, ((c**4).mean().item() / s2**2 - 1) / len(v)

    vx, rx = var_and_rel2(x)
    vy, ry = var_and_rel2(y)
    ratio = vx / vy
    return ratio, ratio * math.sqrt(rx + ry)


class TestVarianceReduction:
    def test_ppots_matches_theoretical_variance_ratio(self):
        """l(t) = g(t) + sigma(t) Z with g = 2/(t + 0.1), sigma = 1/(t + 0.1): S = g^2 + sigma^2.
        Theory: Var_p = int S/p - mu^2 with p the sampler's actual (binned, mixed) density."""

        def S(t):
            return 5.0 / (t + 0.1) ** 2

        mu = 2.0 * math.log(11.0)
        sampler = PPOTS.from_function(lambda t: np.sqrt(S(t)), n_bins=1024, mix=0.05)

        def density(t):
            return sampler.density(torch.from_numpy(t)).numpy()

        n_cells = 64 * 1024  # cells nest in the bins, so the rule is exact in p
        var_p = ppots.importance_second_moment(S, density, n_cells) - mu**2
        var_u = ppots.importance_second_moment(S, np.ones_like, n_cells) - mu**2
        theory = var_p / var_u

        g, n = torch.Generator().manual_seed(0), 400_000
        draws = {}
        for name, s in (("uniform", Uniform()), ("ppots", sampler)):
            t, w = s.sample(n, g)
            z = torch.randn(n, generator=g, dtype=torch.float64)
            draws[name] = w * (2.0 + z) / (t + 0.1)  # [n] weighted estimates
            mean = draws[name].mean().item()
            assert abs(mean - mu) < Z * draws[name].std().item() / math.sqrt(n)
        measured, se = variance_ratio_se(draws["ppots"], draws["uniform"])
        assert abs(measured - theory) < Z * se, (measured, theory, se)
        assert measured + Z * se < 1.0  # a real reduction
        # p* = sqrt(S)/int sqrt(S) minimises int S/p, to (int sqrt S)^2 = 5 ln(11)^2; mixing
        # with the uniform at most multiplies int S/p by 1/(1 - mix), and 1024 bins of this
        # smooth density cost far less than that margin
        root_s2 = 5 * math.log(11) ** 2
        assert (root_s2 - mu**2) / var_u <= theory < (root_s2 / 0.95 - mu**2) / var_u


class TestFromSecondMoment:
    def test_family_method_tabulates_the_fit(self):
        true = TRUE_FAMILIES["rising"]
        S = ppots.family_density(GRID, true) ** 2
        sampler = ppots.density_from_second_moment(GRID, S, method="family", mix=0.05, n_bins=256)
        assert sampler.source["method"] == "family"
        fit = ppots.FamilyParams.from_dict(sampler.source["params"])
        edges = sqrt_edges(256).numpy()
        t, w = 0.5 * (edges[1:] + edges[:-1]), np.diff(edges)  # bin means err by O(w^2)
        f = ppots.family_density(t, fit)
        expected = 0.05 + 0.95 * f / np.sum(f * w)
        got = sampler.density(torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-3)
        json.dumps(sampler.to_dict())

    def test_grid_method_is_a_valid_sampler(self):
        S = (1 + 3 * GRID) ** 2
        sampler = ppots.density_from_second_moment(GRID, S, method="grid", mix=0.1, n_bins=128)
        t, w = sampler.sample(1000, torch.Generator().manual_seed(0))
        assert (t > 0).all() and (t <= 1).all() and w.max() <= 10.0 * (1 + 1e-12)
        assert sampler.source["method"] == "grid"
        assert sampler.density(torch.tensor([0.9])) > sampler.density(torch.tensor([0.1]))

    def test_counts_method_interpolates_the_root(self):
        """sqrt(S) linear in sqrt(t) is reproduced exactly between the grid rates."""
        grid = ppots.rate_grid(16)
        S = (1 + 2 * np.sqrt(grid)) ** 2
        fn = ppots.interpolated_root(grid, S)
        t = np.linspace(grid[0], grid[-1], 101)
        np.testing.assert_allclose(fn(t), 1 + 2 * np.sqrt(t), rtol=1e-12)
        assert fn(np.array([0.0]))[0] == pytest.approx(1 + 2 * np.sqrt(grid[0]))
        sampler = ppots.density_from_second_moment(grid, S, method="counts", mix=0.1, n_bins=64)
        assert sampler.source["method"] == "counts" and len(sampler.source["S"]) == 16

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="'counts', 'family' or 'grid'"):
            ppots.density_from_second_moment(GRID, np.ones(GRID.size), method="spline")
