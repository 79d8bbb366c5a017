"""Small grey images with a class per image: scikit-learn's digits (1,797 8x8 images, shipped
offline) or a folder of PNGs, split into disjoint train, test and classifier parts.

A folder is read in one of two layouts:

- `labels.csv` next to the PNGs, with a header and the columns `file,label` and optionally
  `caption` (the text prompt of that image; default: the task's template over the label);
- no `labels.csv`, one subfolder per class holding its PNGs (the subfolder names the class).

Colour images are converted to grey; every image must have the same size.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .examples import DataError

LABELS_FILE = "labels.csv"
SPLIT_NAMES = ("train", "test", "classifier")


@dataclass(frozen=True)
class ImageSet:
    """`pixels` `[N, H, W]` (float32 in [0, 1]), `labels` `[N]` indexing `class_names`, an
    optional caption and a source (file or index, for messages) per image."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    captions: tuple[str | None, ...]
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at `index`, in that order."""
        return ImageSet(
            self.name,
            self.pixels[index],
            self.labels[index],
            self.class_names,
            tuple(self.captions[i] for i in index),
            tuple(self.sources[i] for i in index),
        )


def load_digits_set() -> ImageSet:
    """scikit-learn's handwritten digits: 8x8 images, grey levels 0-16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    return ImageSet(
        "digits",
        (digits.images / 16.0).astype(np.float32),
        digits.target.astype(np.int64),
        tuple(str(c) for c in range(10)),
        (None,) * n,
        tuple(f"digits #{i}" for i in range(n)),
    )


def read_png(path: Path) -> np.ndarray:
    """A PNG as a grey `[H, W]` float32 array in [0, 1]; DataError naming the file, also for
    an image over Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`), which is
    refused before it is decoded rather than merely warned about."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (
        OSError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise DataError(f"cannot read the image {path}: {err}") from None


def _rows_of_csv(folder: Path) -> list[tuple[Path, str, str | None]]:
    """(file, label, caption) per row of `labels.csv`; DataError naming the line."""
    path = folder / LABELS_FILE
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "file" not in columns or "label" not in columns:
            raise DataError(
                f"{path}: the header must name the columns file,label (and optionally caption), "
                f"got {columns}"
            )
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            file, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
            if not file or not label:
                raise DataError(f"{where}: every row needs a file and a label")
            if not (folder / file).is_file():
                raise DataError(f"{where}: no image file {folder / file}")
            caption = (row.get("caption") or "").strip() or None
            rows.append((folder / file, label, caption))
    return rows


def _rows_of_subfolders(folder: Path) -> list[tuple[Path, str, str | None]]:
    """(file, label, None) for each PNG in a class subfolder; DataError when there are none."""
    rows = [
        (png, sub.name, None)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir())
        for png in sorted(sub.glob("*.png"))
    ]
    if not rows:
        loose = len(list(folder.glob("*.png")))
        raise DataError(
            f"{folder}: no labels for its {loose} PNG image(s): add {LABELS_FILE} with the "
            "columns file,label (optionally caption), or put each class's PNGs in a subfolder "
            "named after the class"
        )
    return rows


def load_image_folder(folder: str | Path) -> ImageSet:
    """The images of `folder` with their labels (see the module docstring for the layouts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    has_csv = (folder / LABELS_FILE).is_file()
    rows = _rows_of_csv(folder) if has_csv else _rows_of_subfolders(folder)
    if not rows:
        raise DataError(f"{folder / LABELS_FILE} lists no images")
    images = [read_png(path) for path, _, _ in rows]
    first = images[0].shape
    for (path, _, _), image in zip(rows, images, strict=True):
        if image.shape != first:
            raise DataError(
                f"{folder}: images of different sizes: {rows[0][0].name} is "
                f"{first[0]}x{first[1]} but {path.relative_to(folder)} is "
                f"{image.shape[0]}x{image.shape[1]}; resize them to one size"
            )
    class_names = tuple(sorted({label for _, label, _ in rows}))
    index = {name: i for i, name in enumerate(class_names)}
    return ImageSet(
        folder.name,
        np.stack(images),
        np.asarray([index[label] for _, label, _ in rows], dtype=np.int64),
        class_names,
        tuple(caption for _, _, caption in rows),
        tuple(str(path) for path, _, _ in rows),
    )


def split_images(
    images: ImageSet, test_size: float, classifier_size: float, seed: int
) -> dict[str, ImageSet]:
    """Disjoint "train", "test" and "classifier" parts, stratified by class (sizes as in
    scikit-learn: a count, or a share of all images when below 1). The classifier part
    trains the judge of generated images and never reaches the MDM."""
    from sklearn.model_selection import train_test_split

    def count(size: float, what: str) -> int:
        n = round(size * len(images)) if 0 < size < 1 else int(size)
        if n < len(images.class_names):
            raise DataError(
                f"{images.name}: {what}={size} gives {n} images, fewer than the "
                f"{len(images.class_names)} classes; raise it"
            )
        return n

    n_test, n_classifier = count(test_size, "test_size"), count(classifier_size, "classifier_size")
    if len(images) - n_test - n_classifier < len(images.class_names):
        raise DataError(
            f"{images.name}: test_size and classifier_size take {n_test + n_classifier} of "
            f"{len(images)} images and leave too few to train on; lower them"
        )
    everything = np.arange(len(images))
    try:
        rest, test = train_test_split(
            everything, test_size=n_test, stratify=images.labels, random_state=seed
        )
        train, judge = train_test_split(
            rest, test_size=n_classifier, stratify=images.labels[rest], random_state=seed
        )
    except ValueError as err:
        raise DataError(
            f"{images.name}: cannot split {len(images)} images stratified by class ({err}); "
            "every class needs a few images in each part"
        ) from None
    return {
        "train": images.subset(train),
        "test": images.subset(test),
        "classifier": images.subset(judge),
    }
