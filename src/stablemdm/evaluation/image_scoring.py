"""Scoring generated images, the CLIP-score analogue of the paper's text-to-image row.

The judge is a small MLP classifier on pixels (scikit-learn), trained on the task's held-out
classifier images, which neither the MDM nor its codebook ever saw. For each prompt's image
it gives the class it sees and its probability for the prompted class: the **class share**
(the share of images assigned to the prompted class, `EvalResult.accuracy` for image tasks)
and the **mean probability** of the prompted class play CLIP score's part. The **Frechet
distance** between the judge's hidden-layer features of the generated images and of the
real test images (FID with the judge in Inception's place) measures quality and diversity
together. Every scored evaluation that writes records also writes a PNG grid of samples,
one row per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..data.atomic import replaced_atomically

JUDGE_HIDDEN = 64  # hidden units of the judge; its activations are the Frechet features
JUDGE_MAX_ITER = 1000
GRID_PER_CLASS = 8  # samples per row of the grid


@runtime_checkable
class ImageTask(Protocol):
    """What the image scorer needs from a task (tasks.images.ImageTask provides it)."""

    name: str
    class_names: list[str]

    def real_images(self, split: str) -> tuple[np.ndarray, np.ndarray]: ...
    def image_of(self, output: str) -> np.ndarray: ...
    def tokenizer_for(self, tokenizer: Any) -> Any: ...
    def canvas_tokens(self, tokenizer: Any) -> list[list[int]] | None: ...


class Judge:
    """An MLP classifier (one ReLU hidden layer) on the pixels of real labelled images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        self.n_classes = n_classes
        self.model = MLPClassifier(
            hidden_layer_sizes=(JUDGE_HIDDEN,), max_iter=JUDGE_MAX_ITER, random_state=seed
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(_flat(images), labels)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """`[N, n_classes]` class probabilities (0 for a class the judge never saw)."""
        out = np.zeros((len(images), self.n_classes))
        out[:, self.model.classes_] = self.model.predict_proba(_flat(images))
        return out

    def features(self, images: np.ndarray) -> np.ndarray:
        """`[N, JUDGE_HIDDEN]` hidden-layer activations, the Frechet distance's features."""
        weights, bias = self.model.coefs_[0], self.model.intercepts_[0]
        return np.maximum(_flat(images) @ weights + bias, 0.0)


def _flat(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


_JUDGES: dict[tuple, tuple[Judge, np.ndarray]] = {}


def judge_for(task: ImageTask) -> tuple[Judge, np.ndarray]:
    """The task's judge, trained once per process on its classifier split, and the features
    of its real test images (the Frechet reference)."""
    images, labels = task.real_images("classifier")
    test, _ = task.real_images("test")
    key = (images.tobytes(), labels.tobytes(), test.tobytes(), len(task.class_names))
    if key not in _JUDGES:
        judge = Judge(images, labels, len(task.class_names))
        _JUDGES[key] = (judge, judge.features(test))
    return _JUDGES[key]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets `[N, D]`;
    the trace of the root is taken through the symmetric S_a^(1/2) S_b S_a^(1/2), so
    singular covariances (units that never fire) are fine."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two images on each side")
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(mean + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def image_metrics(
    images: np.ndarray, labels: np.ndarray, judge: Judge, reference: np.ndarray
) -> dict[str, float | None]:
    """Class share, mean probability of the prompted class (`labels`) and the Frechet distance
    of `images` `[N, H, W]` to the `reference` features (None for a single image)."""
    probs = judge.probabilities(images)  # [N, C]
    rows = np.arange(len(labels))
    return {
        "class_share": float((probs.argmax(1) == labels).mean()),
        "mean_prob": float(probs[rows, labels].mean()),
        "fid": frechet_distance(judge.features(images), reference) if len(images) > 1 else None,
    }


def reconstruction_metrics(task: Any) -> dict[str, float | None]:
    """The metrics of the real test images after a round trip through the task's codebook:
    the best a generator of these tokens can score (its floor of the Frechet distance)."""
    images, labels = task.real_images("test")
    judge, reference = judge_for(task)
    rebuilt = task.codebook.decode(task.codebook.encode(images))
    return image_metrics(rebuilt, labels, judge, reference)


def save_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    per_class: int = GRID_PER_CLASS,
) -> Path:
    """A PNG of up to `per_class` images per class, one row per class, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(len(class_names))]
    cols = max(1, max(len(r) for r in rows))
    fig = Figure(figsize=(0.7 + 0.55 * cols, 0.2 + 0.55 * len(class_names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(class_names), cols, squeeze=False)
    for c, (name, picks) in enumerate(zip(class_names, rows, strict=True)):
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if j < len(picks):
                ax.imshow(images[picks[j]], cmap="gray", vmin=0.0, vmax=1.0)
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.99, top=0.99, bottom=0.01)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


class ImageScorer:
    """Judges the decoded records of an image task (see the module docstring)."""

    def __init__(self, task: ImageTask, tokenizer: Any) -> None:
        self.task = task
        self.tokenizer = task.tokenizer_for(tokenizer)  # refuses another run's codebook
        self.judge, self.reference = judge_for(task)
        # what decoding may put at each canvas position (None: anything)
        self.canvas_tokens = task.canvas_tokens(self.tokenizer)

    def score(
        self, records: list[dict], grid_path: str | Path | None = None
    ) -> dict[str, float | None]:
        """Add `label`, `predicted`, `p_label` and `valid` to each record, set `extracted`
        to the judge's class and `correct` to its agreement with the prompt, write the grid
        when `grid_path` is given, and return the set's metrics (`valid`: the share of whole
        canvases of image tokens)."""
        names = list(self.task.class_names)
        images = np.stack([self.task.image_of(r["output"]) for r in records])  # [N, H, W]
        labels = np.asarray([names.index(r["gold"]) for r in records])  # [N]
        probs = self.judge.probabilities(images)  # [N, C]
        for record, label, p in zip(records, labels, probs, strict=True):
            predicted = int(p.argmax())
            record.update(
                label=names[label],
                predicted=names[predicted],
                p_label=round(float(p[label]), 6),
                valid=bool(record["correct"]),
                extracted=names[predicted],
                correct=bool(predicted == label),
            )
        metrics = image_metrics(images, labels, self.judge, self.reference)
        metrics["valid"] = float(np.mean([r["valid"] for r in records]))
        del metrics["class_share"]  # it is the accuracy
        if grid_path is not None:
            save_grid(images, labels, names, grid_path)
        return metrics


def image_scorer(task: Any, tokenizer: Any) -> ImageScorer | None:
    """The scorer of an image task (None for a text task)."""
    return ImageScorer(task, tokenizer) if isinstance(task, ImageTask) else None
