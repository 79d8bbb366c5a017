"""The image scorer (the CLIP-score analogue): the judge's accuracy on real test images, chance
level on random tokens, the Frechet distance's closed forms, the tokenizer's ceiling, the
scored records and the PNG grid."""

import numpy as np
import pytest
from PIL import Image

from stablemdm.data.image_tokens import spell
from stablemdm.evaluation.image_scoring import (
    ImageScorer,
    frechet_distance,
    image_metrics,
    judge_for,
    reconstruction_metrics,
    save_grid,
)
from stablemdm.tasks import get_task

# the judge (an MLP on pixels, trained on the 500 classifier images) on the 300 real test
# images: measured 0.95
JUDGE_ACCURACY = 0.92


@pytest.fixture(scope="module")
def task():
    return get_task("digits_t2i")


def test_the_judge_classifies_real_test_images_at_the_stated_accuracy(task):
    judge, _ = judge_for(task)
    images, labels = task.real_images("test")
    accuracy = (judge.probabilities(images).argmax(1) == labels).mean()
    assert accuracy >= JUDGE_ACCURACY


def test_random_tokens_score_near_chance(task):
    """Images independent of their prompts: with balanced prompts, the expected class share
    and mean probability are exactly 1/10 whatever the judge prefers."""
    _, labels = task.real_images("test")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, task.codebook.size, (len(labels), task.codebook.n_tokens))
    judge, reference = judge_for(task)
    metrics = image_metrics(task.codebook.decode(codes), labels, judge, reference)
    weights = np.bincount(labels, minlength=10) / len(labels)
    assert np.abs(weights - 0.1).max() < 0.01  # the prompts are balanced
    se = np.sqrt(0.1 * 0.9 / len(labels))
    assert abs(metrics["class_share"] - 0.1) < 3 * se
    assert abs(metrics["mean_prob"] - 0.1) < 3 * se
    real = reconstruction_metrics(task)
    assert metrics["fid"] > 20 * real["fid"]


def test_the_tokenizer_ceiling(task):
    """Real test images through the codebook keep their class and stay close in features."""
    metrics = reconstruction_metrics(task)
    assert metrics["class_share"] >= 0.9 and metrics["mean_prob"] >= 0.85
    assert metrics["fid"] < 0.5


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-8)
    # b = 2a: S_b = 4 S_a, so tr(S_a + 4 S_a - 2 * 2 S_a) = tr(S_a), plus |mean_a|^2
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, 2 * a) == pytest.approx(frechet_distance(2 * a, a), rel=1e-8)
    dead = np.concatenate([a, np.zeros((400, 3))], axis=1)  # units that never fire
    assert frechet_distance(dead, dead + np.r_[shift, 0, 0, 0]) == pytest.approx(5.25)


def test_frechet_distance_of_non_commuting_covariances():
    """Covariances that do not commute, where tr((S_a S_b)^(1/2)) and the wrong
    tr(S_a^(1/2) S_b^(1/2)) differ: the distance matches scipy's matrix square root of
    S_a S_b, and is far from what the wrong formula gives."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    turn = np.array([[1.0, 1.0], [-1.0, 1.0]]) / np.sqrt(2)  # 45 degrees
    a = rng.normal(size=(500, 2)) * [3.0, 0.3]  # elongated along the first axis
    b = (rng.normal(size=(500, 2)) * [3.0, 0.3]) @ turn + [0.5, -1.0]  # along the diagonal
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.abs(cov_a @ cov_b - cov_b @ cov_a).max() > 10
    base = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
    expected = base - 2 * np.trace(sqrtm(cov_a @ cov_b)).real
    wrong = base - 2 * np.trace(sqrtm(cov_a) @ sqrtm(cov_b)).real
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert abs(wrong - expected) > 0.2 * expected


def test_scored_records_and_the_grid(task, tmp_path):
    """Records of perfect outputs (the gold canvases) and of broken ones are judged, and the
    grid has one row per class."""
    examples = task.examples("test")[:40]
    records = [
        {"output": e.response, "gold": e.answer, "correct": task.score(e.response, e)}
        for e in examples
    ]
    records[0]["output"] = records[0]["output"][:20] + "x"  # a broken canvas
    records[0]["correct"] = task.score(records[0]["output"], examples[0])
    scorer = ImageScorer(task, None)
    metrics = scorer.score(records, tmp_path / "grid.png")
    assert metrics["valid"] == pytest.approx(39 / 40)
    assert records[0]["valid"] is False and records[1]["valid"] is True
    assert {"label", "predicted", "p_label", "extracted", "correct"} <= set(records[1])
    assert sum(r["correct"] for r in records) >= 34  # the ceiling is about 0.94
    assert all(r["label"] == r["gold"] for r in records)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height > 10 * 40 and grid.width > 8 * 40


def test_grid_rows_follow_the_classes(tmp_path):
    images = np.stack([np.full((4, 4), v) for v in (0.0, 1.0, 1.0)])
    path = save_grid(images, np.array([0, 1, 1]), ["dark", "light"], tmp_path / "g.png")
    with Image.open(path) as grid:
        pixels = np.asarray(grid.convert("L"), dtype=float)
    top, bottom = pixels[: len(pixels) // 2], pixels[len(pixels) // 2 :]
    assert (top < 30).sum() > 5 * (bottom < 30).sum()  # the dark image is in the first row


def test_spelled_canvases_round_trip_through_the_task(task):
    example = task.examples("train")[0]
    assert task.extract(example.response) == example.response
    assert task.extract(example.response + "<img_1>") is None
    assert task.extract(spell([task.codebook.size] * task.codebook.n_tokens)) is None
    image = task.image_of(example.response)
    codes = task.codebook.encode(image[None])[0]
    assert spell(codes) == example.response
