"""The variance decomposition of paper.md section 2 (the equal-compute comparison, shared with
`estimator: auto`, lives in `estimators.selection` and is re-exported here).

`nested_components` estimates, from a balanced nested design y[i, j, k] (sequence i, rate j,
mask k), the three terms of

    Var[l] = A (mask-pattern noise) + B (masking-rate noise) + C (data noise)

with the unbiased ANOVA estimators A = MS_e, B = (MS_b - MS_e)/K, C = (MS_a - MS_b)/(J K).
Their expectations need no equal-variance assumption, and estimates are never clipped: a
negative value is noise around a small component and is reported as it is.

Standard errors: the sequences i are iid at the top level of the design and every estimate
is a function of per-sequence statistics, so the delete-one jackknife over i is valid
whatever the variances across sequences and rates (it is conservative in expectation,
Efron-Stein). Caution: the single-draw MDM loss is heavy-tailed (the 1/p_mask(t) weight
reaches 1/eps near t = 0), so a few draws can dominate A and B and the jackknife SE itself
becomes unreliable. Pass `bootstrap > 0` and read `unstable` before trusting the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..estimators.selection import (  # noqa: F401  the comparison's math, shared with auto
    EstimatorCost,
    compare_estimators,
    minibatch_variance,
)

COMPONENTS = ("A", "B", "C", "total")


# Bootstrap check (see nested_components): a component is unresolved when its bootstrap std
# exceeds REL_SPREAD_LIMIT * |estimate| (estimate +- 2 std includes 0), and the SEs are
# unreliable when jackknife and bootstrap disagree by more than SE_AGREEMENT_FACTOR.
REL_SPREAD_LIMIT = 0.5


SE_AGREEMENT_FACTOR = 2.0


# Components below this fraction of the total's scale are float rounding around an exact 0
# (an ARM-like input has A = B = 0) and are not checked.
ROUNDING = 1e-12


@dataclass(frozen=True)
class Components:
    """Estimated variance components of one draw of the loss (paper.md section 2).

    A: mask-pattern noise E[Var_m(l | x0, t)]; B: masking-rate noise E[Var_t(E_m[l | x0, t])];
    C: data noise Var(E[l | x0]); total = A + B + C. For vector input (gradients) each is the
    trace of a covariance matrix. `se_*` are delete-one jackknife SEs over sequences (NaN when
    I = 2 for C and total, which need two sequences after deleting one). `mean` is the grand
    mean of y (averaged over coordinates for vector input). `unstable` and
    `bootstrap_rel_spread` are set only when a bootstrap was requested (else None).
    """

    A: float
    B: float
    C: float
    total: float
    se_A: float
    se_B: float
    se_C: float
    se_total: float
    I: int
    J: int
    K: int
    mean: float
    unstable: bool | None = None
    bootstrap_rel_spread: dict[str, float] | None = None

    def to_dict(self) -> dict:
        """All fields as a plain (JSON-ready) dict."""
        return asdict(self)


def _to_numpy(block: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor (any device, any dtype)."""
    if isinstance(block, torch.Tensor):
        return block.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(block, dtype=np.float64)


def _check_finite(y: np.ndarray | torch.Tensor, name: str) -> None:
    """Raise one ValueError giving the count and first index of non-finite entries."""
    finite = torch.isfinite(y) if isinstance(y, torch.Tensor) else np.isfinite(y)
    if bool(finite.all()):
        return
    bad = ~finite
    count = int(bad.sum())
    where = bad.nonzero() if isinstance(bad, torch.Tensor) else np.argwhere(bad)
    first = tuple(int(v) for v in where[0])
    raise ValueError(
        f"{name}: {count} non-finite value(s) (NaN or inf), the first at index {first}; "
        "drop or recompute those draws before estimating variances"
    )


def _check_design(y: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """Validate the nested design's shape and values and return (I, J, K)."""
    if y.ndim not in (3, 4):
        raise ValueError(
            "nested_components: y must have shape [I, J, K] (scalar losses) or [I, J, K, P] "
            f"(vectors such as gradients), got shape {tuple(y.shape)}"
        )
    I, J, K = (int(v) for v in y.shape[:3])
    if I < 2:
        raise ValueError(
            f"nested_components: need at least 2 sequences (I = {I}); data noise C is the "
            "spread between sequences, so draw more sequences"
        )
    if J < 2:
        raise ValueError(
            f"nested_components: J = {J} rate per sequence, so masking-rate noise B cannot be "
            "separated from data noise C (only A and B + C are identifiable); draw at least 2 "
            "rates t per sequence"
        )
    if K < 2:
        raise ValueError(
            f"nested_components: K = {K} mask per rate, so mask-pattern noise A cannot be "
            "separated from masking-rate noise B (only A + B and C are identifiable); draw at "
            "least 2 masks per (sequence, rate)"
        )
    if y.ndim == 4 and y.shape[3] == 0:
        raise ValueError("nested_components: y has P = 0 coordinates; pass at least one")
    _check_finite(y, "nested_components: y")
    return I, J, K


def _per_sequence_stats(
    y: np.ndarray | torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sequence sums of squares and means, converting one sequence at a time to float64.

    Returns e [I] (sum over j, k, p of (y_ijk - mean_ij.)^2), b [I] (sum over j, p of
    (mean_ij. - mean_i..)^2) and the sequence means m [I, P].
    """
    e, b, m = [], [], []
    for i in range(y.shape[0]):
        yi = _to_numpy(y[i])  # [J, K] or [J, K, P]
        if yi.ndim == 2:
            yi = yi[..., None]  # [J, K, 1]
        m_ij = yi.mean(axis=1)  # [J, P]
        m_i = m_ij.mean(axis=0)  # [P]
        e.append(((yi - m_ij[:, None, :]) ** 2).sum())
        b.append(((m_ij - m_i) ** 2).sum())
        m.append(m_i)
    return np.array(e), np.array(b), np.stack(m)


def _components_from_counts(
    counts: np.ndarray, e: np.ndarray, b: np.ndarray, gram: np.ndarray, J: int, K: int
) -> np.ndarray:
    """A, B, C, total `[R, 4]` for R weightings of the sequences (counts `[R, I]`).

    All-ones counts give the estimate itself, delete-one rows the jackknife replicates and
    multinomial rows the bootstrap replicates. `gram` `[I, I]` holds inner products of the
    centred sequence means, so SS_a = sum_i c_i |m_i - mean_c|^2 needs no [R, P] array.
    """
    n = counts.sum(axis=1)  # [R]
    ms_e = counts @ e / (n * J * (K - 1))
    ms_b = K * (counts @ b) / (n * (J - 1))
    ss_a = counts @ np.diag(gram) - ((counts @ gram) * counts).sum(axis=1) / n
    ms_a = np.where(n > 1, J * K * ss_a / np.maximum(n - 1, 1), np.nan)
    a = ms_e
    b_hat = (ms_b - ms_e) / K
    c = (ms_a - ms_b) / (J * K)
    return np.stack([a, b_hat, c, a + b_hat + c], axis=1)


def _bootstrap(
    stats: tuple[np.ndarray, np.ndarray, np.ndarray, int, int],
    estimate: np.ndarray,
    se: np.ndarray,
    n_boot: int,
    seed: int,
) -> tuple[bool, dict[str, float]]:
    """Resample sequences with replacement; return (unstable, bootstrap std / |estimate|)."""
    e, b, gram, J, K = stats
    I = e.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(I, (n_boot, I), generator=generator).numpy()  # [R, I]
    counts = np.zeros((n_boot, I))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
    boot_se = _components_from_counts(counts, e, b, gram, J, K).std(axis=0, ddof=1)  # [4]
    negligible = ROUNDING * max(abs(estimate[-1]), boot_se[-1])
    spread = {}
    unstable = False
    for name, est, s_boot, s_jack in zip(COMPONENTS, estimate, boot_se, se, strict=True):
        if max(abs(est), s_boot) <= negligible:
            spread[name] = 0.0
            continue
        spread[name] = float(s_boot / abs(est)) if est != 0.0 else float("inf")
        ratio_ok = max(s_boot, s_jack) <= SE_AGREEMENT_FACTOR * min(s_boot, s_jack)
        agree = bool(np.isfinite(s_jack)) and ratio_ok
        unstable = unstable or spread[name] > REL_SPREAD_LIMIT or not agree
    return unstable, spread


def nested_components(
    y: np.ndarray | torch.Tensor, *, bootstrap: int = 0, seed: int = 0
) -> Components:
    """Unbiased A/B/C estimates with jackknife SEs from a nested design (paper.md section 2).

    `y` `[I, J, K]` holds scalar per-sequence losses, `[I, J, K, P]` vectors (squared
    deviations are summed over P, giving covariance traces). Computed in float64.

    With `bootstrap` > 0, the sequences are also resampled with replacement that many times
    (indices from a torch.Generator seeded with `seed`) and the result carries
    `bootstrap_rel_spread` (bootstrap std / |estimate| per component; 0 for a component that
    is an exact 0 up to rounding, e.g. A and B of an ARM) and `unstable`, which is True when
    for any component the bootstrap std exceeds REL_SPREAD_LIMIT = 0.5 times |estimate| (the
    interval estimate +- 2 std includes 0, so its size is not resolved) or the jackknife and
    bootstrap SEs differ by more than a factor SE_AGREEMENT_FACTOR = 2. One dominating draw
    (a 1/eps weight near t = 0) makes the relative spread about 1 and trips the first rule.
    If unstable, use more sequences (I) and draws (J, K), or a lower-variance estimator,
    before reading A, B, C.
    With I = 2 the jackknife SEs of C and total are NaN, so such a design is always unstable.
    """
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(
            f"nested_components: bootstrap must be 0 (off) or >= 2 resamples, got {bootstrap}"
        )
    if not isinstance(y, torch.Tensor):
        y = np.asarray(y)
    I, J, K = _check_design(y)
    e, b, m = _per_sequence_stats(y)
    centred = m - m.mean(axis=0)  # [I, P]
    gram = centred @ centred.T  # [I, I]
    estimate = _components_from_counts(np.ones((1, I)), e, b, gram, J, K)[0]  # [4]
    leave_one_out = _components_from_counts(1.0 - np.eye(I), e, b, gram, J, K)  # [I, 4]
    deviation = leave_one_out - leave_one_out.mean(axis=0)
    se = np.sqrt((I - 1) / I * (deviation**2).sum(axis=0))  # [4]
    unstable, spread = None, None
    if bootstrap > 0:
        unstable, spread = _bootstrap((e, b, gram, J, K), estimate, se, bootstrap, seed)
    a, b_hat, c, total = (float(v) for v in estimate)
    se_a, se_b, se_c, se_total = (float(v) for v in se)
    return Components(
        A=a,
        B=b_hat,
        C=c,
        total=total,
        se_A=se_a,
        se_B=se_b,
        se_C=se_c,
        se_total=se_total,
        I=I,
        J=J,
        K=K,
        mean=float(m.mean()),
        unstable=unstable,
        bootstrap_rel_spread=spread,
    )
