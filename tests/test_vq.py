"""The image codebook: patches in raster order, the k-means and grey quantisers, the round trip
on held-out test images within a stated error, saving, and refusing bad settings."""

import numpy as np
import pytest

from stablemdm.data.images import load_digits_set, split_images
from stablemdm.data.vq import Codebook, fit_codebook, from_patches, to_patches
from stablemdm.errors import ConfigError

# per-pixel root mean square error of encode -> decode on the 300 digits test images
# (measured: k-means 64 codes of 2x2 patches 0.074, 4 grey levels 0.063)
KMEANS_RMSE = 0.09
GREY_RMSE = 0.08


@pytest.fixture(scope="module")
def digits():
    return split_images(load_digits_set(), 300, 500, seed=0)


def test_patches_are_raster_order_and_invertible():
    images = np.arange(2 * 4 * 6, dtype=float).reshape(2, 4, 6)
    patches = to_patches(images, 2)  # [2, 6, 4]
    assert patches.shape == (2, 6, 4)
    assert patches[0, 1].tolist() == [2, 3, 8, 9]  # second patch of the first row
    assert patches[0, 3].tolist() == [12, 13, 18, 19]  # first patch of the second row
    assert np.array_equal(from_patches(patches, 2, (4, 6)), images)


@pytest.mark.parametrize(
    "kind,size,patch,limit", [("kmeans", 64, 2, KMEANS_RMSE), ("grey", 4, 1, GREY_RMSE)]
)
def test_round_trip_on_test_images_is_within_the_stated_error(digits, kind, size, patch, limit):
    book = fit_codebook(digits["train"].pixels, kind, size, patch, seed=0)
    test = digits["test"].pixels
    codes = book.encode(test)
    assert codes.shape == (len(test), book.n_tokens) and codes.max() < size
    rebuilt = book.decode(codes)
    rmse = float(np.sqrt(((rebuilt - test) ** 2).mean()))
    assert rmse < limit
    assert np.array_equal(book.encode(rebuilt), codes)  # a decoded image is a fixed point


def test_kmeans_beats_its_own_mean_patch(digits):
    """The codebook carries information: it reconstructs far better than one mean patch."""
    book = fit_codebook(digits["train"].pixels, "kmeans", 64, 2, seed=0)
    test = digits["test"].pixels
    mean = digits["train"].pixels.mean()
    err = ((book.decode(book.encode(test)) - test) ** 2).mean()
    assert err < 0.2 * ((test - mean) ** 2).mean()


def test_unknown_codes_decode_blank(digits):
    book = fit_codebook(digits["train"].pixels, "grey", 3, 1)
    codes = np.full((1, 64), 2)
    codes[0, :8] = -1  # no image token in the first row
    image = book.decode(codes)[0]
    assert (image[0] == 0).all() and (image[1:] == 1).all()


def test_save_load_round_trip_and_fingerprint(digits, tmp_path):
    train = digits["train"].pixels
    book = fit_codebook(train, "kmeans", 16, 2, seed=0, about="digits")
    book.save(tmp_path / "codebook.json")
    again = Codebook.load(tmp_path / "codebook.json")
    assert again.fingerprint == book.fingerprint and again.about == "digits"
    assert np.array_equal(again.encode(train[:50]), book.encode(train[:50]))
    assert fit_codebook(train, "kmeans", 16, 2, seed=0).fingerprint == book.fingerprint
    assert fit_codebook(train, "kmeans", 16, 2, seed=1).fingerprint != book.fingerprint
    assert fit_codebook(train[1:], "kmeans", 16, 2, seed=0).fingerprint != book.fingerprint


@pytest.mark.parametrize(
    "kind,size,patch,match",
    [
        ("kmeans", 64, 3, "patch=3 must divide the image size 8x8"),
        ("grey", 4, 2, "quantiser=grey quantises single pixels: set patch=1"),
        ("vq", 4, 1, "unknown quantiser 'vq'"),
        ("kmeans", 1, 2, "codebook_size=1 must be at least 2"),
    ],
)
def test_bad_settings_are_one_clear_line(digits, kind, size, patch, match):
    with pytest.raises(ConfigError, match=match):
        fit_codebook(digits["train"].pixels[:50], kind, size, patch)


def test_more_codes_than_distinct_patches_is_refused():
    images = np.zeros((4, 4, 4))
    images[:, 0, 0] = 1.0
    with pytest.raises(ConfigError, match="more than the 2 distinct 2x2 patches"):
        fit_codebook(images, "kmeans", 8, 2)


def test_a_damaged_codebook_file_is_one_line(tmp_path):
    path = tmp_path / "codebook.json"
    path.write_text('{"kind": "kmeans", "patch": 2}')
    with pytest.raises(ConfigError, match=f"{path} is not a codebook"):
        Codebook.load(path)
