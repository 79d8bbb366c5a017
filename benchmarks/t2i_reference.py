"""Reference points of the text-to-image scorer (docs/t2i.md): the judge's accuracy on real
test images, the codebook's round-trip error and ceiling, the Frechet distance between two
real samples, and random tokens, for each quantiser given.

    python benchmarks/t2i_reference.py                      # digits_t2i, k-means 64 x 2x2
    python benchmarks/t2i_reference.py --quantiser grey --codebook-size 4 --patch 1
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from stablemdm.evaluation.image_scoring import image_metrics, judge_for, reconstruction_metrics
from stablemdm.tasks import get_task


def reference(task) -> dict[str, float | None]:
    """The scorer's reference numbers for `task` (see the module docstring)."""
    judge, features = judge_for(task)
    test, labels = task.real_images("test")
    train, train_labels = task.real_images("train")
    rebuilt = task.codebook.decode(task.codebook.encode(test))
    rng = np.random.default_rng(0)
    other = rng.choice(len(train), len(test), replace=False)  # as many real train images
    codes = rng.integers(0, task.codebook.size, (len(test), task.codebook.n_tokens))
    return {
        "judge_accuracy_real_test": float((judge.probabilities(test).argmax(1) == labels).mean()),
        "round_trip_rmse": float(np.sqrt(((rebuilt - test) ** 2).mean())),
        **{f"round_trip_{k}": v for k, v in reconstruction_metrics(task).items()},
        **{
            f"real_train_{k}": v
            for k, v in image_metrics(train[other], train_labels[other], judge, features).items()
        },
        **{
            f"random_tokens_{k}": v
            for k, v in image_metrics(task.codebook.decode(codes), labels, judge, features).items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantiser", default="kmeans")
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=2)
    args = parser.parse_args()
    task = get_task(
        "digits_t2i", quantiser=args.quantiser, codebook_size=args.codebook_size, patch=args.patch
    )
    print(json.dumps({"options": vars(args), **reference(task)}, indent=1))


if __name__ == "__main__":
    main()
