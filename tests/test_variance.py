"""Tests for the nested A/B/C decomposition and the equal-compute comparison (variance.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablemdm.variance.decompose import compare_estimators, minibatch_variance, nested_components

F64 = torch.float64

# Synthetic nested design with unequal variances across sequences and rates:
#   y_ijk = mu_i + s_i * beta_ij + s_i * u_ij * eps_ijk,
#   mu_i ~ N(0, C_TRUE), s_i ~ U(0.5, 1.5), beta_ij ~ N(0, 1), u_ij ~ U(0.2, 1.2),
#   eps_ijk ~ N(0, 1), all independent. E[l | x0] = mu_i, E_m[l | x0, t] = mu_i + s_i beta_ij,
#   so A = E[s^2] E[u^2], B = E[s^2] Var(beta), C = Var(mu).
C_TRUE = 0.5
E_S2 = 1.0 + 1.0 / 12.0  # mean^2 + variance of U(0.5, 1.5)
E_U2 = (1.2**3 - 0.2**3) / 3.0  # second moment of U(0.2, 1.2)
TRUTH = {"A": E_S2 * E_U2, "B": E_S2 * 1.0, "C": C_TRUE}
TRUTH["total"] = TRUTH["A"] + TRUTH["B"] + TRUTH["C"]
NAMES = ("A", "B", "C", "total")


def synthetic(I: int, J: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """One draw `[I, J, K]` of the heteroscedastic nested design above."""
    mu = torch.randn(I, 1, 1, generator=generator, dtype=F64) * math.sqrt(C_TRUE)
    s = 0.5 + torch.rand(I, 1, 1, generator=generator, dtype=F64)
    beta = torch.randn(I, J, 1, generator=generator, dtype=F64)
    u = 0.2 + torch.rand(I, J, 1, generator=generator, dtype=F64)
    eps = torch.randn(I, J, K, generator=generator, dtype=F64)
    return mu + s * beta + s * u * eps  # [I, J, K]


def _values(c, prefix: str = "") -> np.ndarray:
    return np.array([getattr(c, prefix + name) for name in NAMES])


@pytest.fixture(scope="module")
def small_design_reps() -> tuple[np.ndarray, np.ndarray]:
    """Estimates and jackknife SEs `[300, 4]` over 300 independent I=8, J=4, K=3 designs."""
    generator = torch.Generator().manual_seed(1)
    reps = [nested_components(synthetic(8, 4, 3, generator)) for _ in range(300)]
    return np.stack([_values(r) for r in reps]), np.stack([_values(r, "se_") for r in reps])


def test_large_design_recovers_truth():
    c = nested_components(synthetic(400, 8, 4, torch.Generator().manual_seed(0)))
    for name in NAMES:
        err = getattr(c, name) - TRUTH[name]
        assert abs(err) < 4 * getattr(c, "se_" + name), (name, err)
    assert c.total == pytest.approx(c.A + c.B + c.C)
    assert (c.I, c.J, c.K) == (400, 8, 4)


def test_small_design_unbiased_and_not_clipped(small_design_reps):
    est, _ = small_design_reps
    n = est.shape[0]
    mc_se = est.std(axis=0, ddof=1) / math.sqrt(n)
    for col, name in enumerate(NAMES):
        assert abs(est[:, col].mean() - TRUTH[name]) < 4 * mc_se[col], name
    # C_hat has only I - 1 = 7 degrees of freedom here: some estimates fall below 0 and must
    # be reported as they are.
    assert (est[:, 2] < 0).any()


def test_jackknife_se_calibrated(small_design_reps):
    """Across repetitions, Var(estimate) / mean(SE^2) should be at most 1 up to Monte Carlo
    noise (Efron-Stein: the jackknife variance is conservative in expectation) and not far
    below it: a ratio under 1/2 would mean SEs overstated by more than sqrt(2), which the
    small O(1/I) jackknife excess of these quadratic statistics cannot explain."""
    est, se = small_design_reps
    n = est.shape[0]
    for col, name in enumerate(NAMES):
        u = (est[:, col] - est[:, col].mean()) ** 2  # [n], mean = empirical variance
        v = se[:, col] ** 2  # [n]
        ratio = u.mean() / v.mean()
        ratio_se = (u - ratio * v).std(ddof=1) / (math.sqrt(n) * v.mean())  # delta method
        assert 0.5 < ratio < 1.0 + 4 * ratio_se, (name, ratio, ratio_se)


def test_vector_input_is_sum_of_coordinates():
    generator = torch.Generator().manual_seed(2)
    y = torch.stack([synthetic(6, 3, 4, generator) * (p + 1) for p in range(5)], dim=-1)
    vector = nested_components(y)  # y: [6, 3, 4, 5]
    per_coord = [nested_components(y[..., p]) for p in range(5)]
    for name in NAMES:
        assert getattr(vector, name) == pytest.approx(sum(getattr(c, name) for c in per_coord))
    assert vector.mean == pytest.approx(np.mean([c.mean for c in per_coord]))


def test_arm_like_input_has_only_data_noise():
    generator = torch.Generator().manual_seed(3)
    per_sequence = torch.randn(12, generator=generator, dtype=F64) * 1.7 + 0.3  # [I]
    y = per_sequence[:, None, None].expand(12, 5, 3)  # [I, J, K], same loss for every t, m
    c = nested_components(y, bootstrap=50)
    sample_var = float(per_sequence.var(unbiased=True))
    assert abs(c.A) <= 1e-12 * sample_var and abs(c.B) <= 1e-12 * sample_var
    assert c.C == pytest.approx(sample_var, rel=1e-12)
    assert c.bootstrap_rel_spread["A"] == 0.0 and c.bootstrap_rel_spread["B"] == 0.0


def test_numpy_torch_and_float32_inputs_agree():
    y = synthetic(5, 3, 2, torch.Generator().manual_seed(4))
    from_torch = nested_components(y).to_dict()
    from_numpy = nested_components(y.numpy()).to_dict()
    assert from_torch == from_numpy
    from_float32 = nested_components(y.float()).to_dict()
    for name in NAMES:
        assert from_float32[name] == pytest.approx(from_torch[name], rel=1e-5)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((4, 3), "must have shape"),
        ((4, 3, 2, 2, 2), "must have shape"),
        ((1, 3, 2), "need at least 2 sequences"),
        ((4, 1, 2), "B cannot be separated from data noise C"),
        ((4, 3, 1), "A cannot be separated from masking-rate noise B"),
    ],
)
def test_design_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        nested_components(np.zeros(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_error_names_count_and_index(bad):
    y = np.zeros((4, 3, 2))
    y[2, 1, 0] = bad
    y[3, 0, 1] = bad
    with pytest.raises(ValueError, match=r"2 non-finite .* index \(2, 1, 0\)"):
        nested_components(torch.from_numpy(y))


def test_bootstrap_is_seeded_and_quiet_on_well_behaved_data():
    y = synthetic(200, 8, 4, torch.Generator().manual_seed(5))
    first = nested_components(y, bootstrap=200, seed=7)
    assert first == nested_components(y, bootstrap=200, seed=7)
    assert first.unstable is False
    assert set(first.bootstrap_rel_spread) == set(NAMES)
    plain = nested_components(y)
    assert plain.unstable is None and plain.bootstrap_rel_spread is None
    with pytest.raises(ValueError, match="bootstrap"):
        nested_components(y, bootstrap=1)


def test_bootstrap_flags_one_dominating_draw():
    """One huge draw (a 1/eps weight near t = 0) dominates A and the total: the bootstrap
    spread of A is then about |A| itself, which the instability rule must catch."""
    y = synthetic(200, 8, 4, torch.Generator().manual_seed(5))
    y[0, 0, 0] += 1e3
    c = nested_components(y, bootstrap=200, seed=7)
    assert c.unstable is True
    assert c.bootstrap_rel_spread["A"] > 0.5


def test_minibatch_variance_known_trace():
    generator = torch.Generator().manual_seed(6)
    R, P = 4000, 5
    scale = torch.randn(P, P, generator=generator, dtype=F64)  # covariance = scale scale^T
    draws = torch.randn(R, P, generator=generator, dtype=F64) @ scale.T + 3.0  # [R, P]
    cov = scale @ scale.T
    trace, se = minibatch_variance(draws)
    assert abs(trace - float(cov.trace())) < 4 * se
    # Gaussian closed form: Var(trace of sample covariance) = 2 tr(cov^2) / (R - 1). The SE
    # estimate itself has relative error about sqrt((kurtosis(z) - 1) / R) / 2.
    exact = math.sqrt(2 * float((cov @ cov).trace()) / (R - 1))
    z = ((draws - draws.mean(0)) ** 2).sum(1)  # [R]
    kurtosis = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(se / exact - 1) < 4 * 0.5 * math.sqrt((kurtosis - 1) / R)
    scalar_trace, _ = minibatch_variance(draws[:, 0].numpy())
    assert scalar_trace == pytest.approx(float(draws[:, 0].var()))


@pytest.mark.parametrize(
    ("draws", "message"),
    [
        (np.zeros((2, 3)), "at least 3"),
        (np.zeros((5, 2, 2)), "must have shape"),
        (np.array([0.0, 1.0, np.nan, 2.0]), r"1 non-finite .* index \(2,\)"),
    ],
)
def test_minibatch_variance_errors(draws, message):
    with pytest.raises(ValueError, match=message):
        minibatch_variance(draws)


def _draws(std: float, R: int, seed: int) -> torch.Tensor:
    return torch.randn(R, 3, generator=torch.Generator().manual_seed(seed), dtype=F64) * std


def test_compare_estimators_ranks_and_ratios():
    results = {
        "standard": (_draws(2.0, 3000, 10), 1),  # trace 12, cost 12 per pass
        "mirror": (_draws(1.0, 3000, 11), 2),  # trace 3, cost 6: twice as efficient
        "noisy": (_draws(3.0, 3000, 12), 1),  # trace 27, cost 27
    }
    rows = compare_estimators(results, reference="standard", floor=0.5)
    assert [r["name"] for r in rows] == ["mirror", "standard", "noisy"]
    by_name = {r["name"]: r for r in rows}
    ref = by_name["standard"]
    assert ref["ratio_to_reference"] == 1.0 and ref["ratio_se"] == 0.0
    for row in rows:
        variance, se = minibatch_variance(results[row["name"]][0])
        assert row["variance"] == variance and row["se"] == se
        assert row["variance_x_passes"] == pytest.approx(variance * row["forward_passes"])
        expected = ref["variance_x_passes"] / row["variance_x_passes"]
        assert row["ratio_to_reference"] == pytest.approx(expected)
        assert row["gap_to_floor"] == pytest.approx(variance / 0.5)
    mirror = by_name["mirror"]
    assert abs(mirror["ratio_to_reference"] - 2.0) < 4 * mirror["ratio_se"]
    assert "gap_to_floor" not in compare_estimators(results)[0]


def test_compare_estimators_errors():
    results = {"standard": (_draws(1.0, 10, 0), 1), "mirror": (_draws(1.0, 10, 1), 2)}
    with pytest.raises(ValueError, match="unknown reference 'arm'.*mirror, standard"):
        compare_estimators(results, reference="arm")
    with pytest.raises(ValueError, match="positive int"):
        compare_estimators({"standard": (_draws(1.0, 10, 0), 0)})
    with pytest.raises(ValueError, match="shapes differ"):
        compare_estimators({**results, "other": (np.zeros(10), 1)})
