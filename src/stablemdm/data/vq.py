"""Image tokens through a codebook, as MMaDA's image tokenizer at CPU scale: a k-means vector
quantiser over pixel patches (fitted on the training split) or plain grey-level quantisation
of single pixels. Images are `[N, H, W]` floats in [0, 1]; an image is `(H / p) * (W / p)`
tokens, its patches in raster order. A codebook carries a fingerprint of what it was fitted
on, so a run's saved codebook is never silently swapped for another."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

QUANTISERS = ("kmeans", "grey")
CODEBOOK_FILE = "codebook.json"
BLANK = 0.0  # the pixel value drawn where a canvas position holds no image token


def check_patch(shape: tuple[int, int], patch: int) -> None:
    """ConfigError unless `patch` is positive and divides both image sides."""
    height, width = shape
    if patch < 1 or height % patch or width % patch:
        raise ConfigError(
            f"patch={patch} must divide the image size {height}x{width}; choose a divisor"
        )


def to_patches(images: np.ndarray, patch: int) -> np.ndarray:
    """`[N, H, W]` -> `[N, T, p*p]`: the p x p patches of each image in raster order."""
    n, height, width = images.shape
    check_patch((height, width), patch)
    rows, cols = height // patch, width // patch
    grid = images.reshape(n, rows, patch, cols, patch).transpose(0, 1, 3, 2, 4)
    return grid.reshape(n, rows * cols, patch * patch)


def from_patches(patches: np.ndarray, patch: int, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of `to_patches`: `[N, T, p*p]` -> `[N, H, W]`."""
    height, width = shape
    rows, cols = height // patch, width // patch
    grid = patches.reshape(len(patches), rows, cols, patch, patch).transpose(0, 1, 3, 2, 4)
    return grid.reshape(len(patches), height, width)


def fingerprint(**inputs: object) -> str:
    """A short stable hash of a codebook's fitting inputs (arrays by their bytes)."""
    digest = hashlib.sha256()
    for key in sorted(inputs):
        value = inputs[key]
        digest.update(f"{key}=".encode())
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            digest.update(repr(value).encode())
        digest.update(b";")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Codebook:
    """`centers` `[K, p*p]` (pixel values in [0, 1]) of `kind` over p x p patches of images of
    `image_shape`; `fingerprint` names what it was fitted on, `about` says it in words."""

    kind: str
    patch: int
    image_shape: tuple[int, int]
    centers: np.ndarray
    fingerprint: str
    about: str = ""

    @property
    def size(self) -> int:
        """The number of codes K."""
        return len(self.centers)

    @property
    def n_tokens(self) -> int:
        """Tokens per image: (H / p) * (W / p)."""
        height, width = self.image_shape
        return (height // self.patch) * (width // self.patch)

    def _check_images(self, images: np.ndarray) -> None:
        if images.ndim != 3 or tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(
                f"the codebook is for {self.image_shape[0]}x{self.image_shape[1]} images, got "
                f"an array of shape {list(images.shape)}"
            )

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Codes `[N, T]` (int64): each patch's nearest centre in squared distance."""
        self._check_images(images)
        flat = to_patches(images.astype(np.float64), self.patch)  # [N, T, D]
        centers = self.centers.astype(np.float64)  # [K, D]
        distance = (
            (flat**2).sum(-1)[..., None] - 2 * flat @ centers.T + (centers**2).sum(-1)
        )  # [N, T, K]
        return distance.argmin(-1).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Images `[N, H, W]` of codes `[N, T]`; a code outside [0, K) (no image token there)
        is drawn as a BLANK patch."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.n_tokens:
            raise ValueError(f"expected codes of shape [N, {self.n_tokens}], got {codes.shape}")
        known = (codes >= 0) & (codes < self.size)  # [N, T]
        patches = self.centers[np.where(known, codes, 0)]  # [N, T, D]
        patches = np.where(known[..., None], patches, BLANK)
        return from_patches(patches, self.patch, self.image_shape).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "patch": self.patch,
            "image_shape": list(self.image_shape),
            "centers": np.round(self.centers, 6).tolist(),
            "fingerprint": self.fingerprint,
            "about": self.about,
        }

    @classmethod
    def from_dict(cls, spec: dict, where: str = "codebook") -> Codebook:
        """A codebook from `to_dict`'s output; ConfigError naming `where` when malformed."""
        try:
            centers = np.asarray(spec["centers"], dtype=np.float64)
            shape = tuple(int(x) for x in spec["image_shape"])
            book = cls(
                str(spec["kind"]),
                int(spec["patch"]),
                shape,
                centers,
                str(spec["fingerprint"]),
                str(spec.get("about", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where} is not a codebook ({type(err).__name__}: {err})") from None
        if book.kind not in QUANTISERS or centers.ndim != 2 or len(shape) != 2:
            raise ConfigError(f"{where} is not a codebook (kind, centers or image_shape)")
        check_patch(shape, book.patch)
        if centers.shape[1] != book.patch**2:
            raise ConfigError(
                f"{where}: centres of {centers.shape[1]} values for patch {book.patch}"
            )
        return book

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the codebook {path}: {err}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{path} is not a codebook (expected a JSON object)")
        return cls.from_dict(spec, where=str(path))


def fit_codebook(
    images: np.ndarray, kind: str, size: int, patch: int, seed: int = 0, about: str = ""
) -> Codebook:
    """A codebook of `size` codes fitted on `images` `[N, H, W]`: k-means over their p x p
    patches (scikit-learn, seeded), or `size` evenly spaced grey levels of single pixels.
    Either kind's fingerprint covers `images` (the training split it was made for)."""
    if kind not in QUANTISERS:
        raise ConfigError(f"unknown quantiser {kind!r}; choose one of {list(QUANTISERS)}")
    if size < 2:
        raise ConfigError(f"codebook_size={size} must be at least 2")
    shape = (int(images.shape[1]), int(images.shape[2]))
    check_patch(shape, patch)
    if kind == "grey":
        if patch != 1:
            raise ConfigError(f"quantiser=grey quantises single pixels: set patch=1, not {patch}")
        centers = np.linspace(0.0, 1.0, size)[:, None]
        # the levels are fixed, but a model trained on these images must not be read with
        # another split (whose test and judge images would hold its training images)
        key = fingerprint(kind=kind, size=size, shape=shape, images=images)
        return Codebook(kind, 1, shape, centers, key, about or f"{size} grey levels")
    from sklearn.cluster import KMeans

    flat = to_patches(images.astype(np.float64), patch).reshape(-1, patch * patch)
    distinct = len(np.unique(flat, axis=0))
    if distinct < size:
        raise ConfigError(
            f"codebook_size={size} is more than the {distinct} distinct {patch}x{patch} patches "
            "of the training images; lower codebook_size"
        )
    kmeans = KMeans(n_clusters=size, n_init=1, random_state=seed).fit(flat)
    key = fingerprint(kind=kind, size=size, patch=patch, seed=seed, images=images)
    return Codebook(kind, patch, shape, kmeans.cluster_centers_.clip(0, 1), key, about)
