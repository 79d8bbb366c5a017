"""Image sources: the digits set, folders of PNGs in both layouts, disjoint stratified splits,
and one clear line for a folder without labels, mixed image sizes or a broken labels file."""

import numpy as np
import pytest
from PIL import Image

from stablemdm.data import DataError
from stablemdm.data.images import load_digits_set, load_image_folder, split_images


def _png(path, value: int, size=(8, 8), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(array, mode).save(path)


def test_digits_are_scaled_grey_images_with_ten_classes():
    digits = load_digits_set()
    assert digits.pixels.shape == (1797, 8, 8) and digits.pixels.dtype == np.float32
    assert digits.pixels.min() == 0.0 and digits.pixels.max() == 1.0
    assert digits.class_names == tuple("0123456789")


def test_splits_are_disjoint_stratified_and_sized():
    digits = load_digits_set()
    parts = split_images(digits, 300, 500, seed=0)
    sources = [set(parts[s].sources) for s in ("train", "test", "classifier")]
    assert [len(s) for s in sources] == [997, 300, 500]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    counts = np.bincount(parts["test"].labels, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 32  # stratified: about 30 per class
    again = split_images(digits, 300, 500, seed=0)
    assert again["test"].sources == parts["test"].sources  # the split is fixed by its seed


def test_split_sizes_that_leave_no_training_images_are_refused():
    with pytest.raises(DataError, match="leave too few to train on"):
        split_images(load_digits_set(), 0.5, 0.5, seed=0)


def test_a_folder_with_labels_csv_and_captions(tmp_path):
    for i in range(4):
        _png(tmp_path / f"img{i}.png", 60 * i, mode="RGB" if i == 3 else "L")
    (tmp_path / "labels.csv").write_text(
        "file,label,caption\nimg0.png,dark,a dark square\nimg1.png,dark,\n"
        "img2.png,light,\nimg3.png,light,very light\n"
    )
    images = load_image_folder(tmp_path)
    assert images.class_names == ("dark", "light")
    assert images.labels.tolist() == [0, 0, 1, 1]
    assert images.captions == ("a dark square", None, None, "very light")
    assert images.pixels.shape == (4, 8, 8)
    assert np.allclose(images.pixels[3], 180 / 255)  # colour converted to grey


def test_a_folder_with_one_subfolder_per_class(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", 100)
    images = load_image_folder(tmp_path)
    assert images.class_names == ("cat", "dog") and images.labels.tolist() == [0, 0, 1, 1]


def test_a_folder_without_labels_is_one_line(tmp_path):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 0)
    with pytest.raises(DataError, match=r"no labels for its 2 PNG image\(s\): add labels.csv"):
        load_image_folder(tmp_path)


def test_mixed_image_sizes_are_one_line(tmp_path):
    _png(tmp_path / "a" / "small.png", 0, size=(8, 8))
    _png(tmp_path / "b" / "large.png", 0, size=(16, 8))
    with pytest.raises(
        DataError, match=r"different sizes: small.png is 8x8 but b/large.png is 8x16"
    ):
        load_image_folder(tmp_path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("name,class\na.png,x\n", "the header must name the columns file,label"),
        ("file,label\na.png,\n", r"labels.csv:2: every row needs a file and a label"),
        ("file,label\nmissing.png,x\n", r"labels.csv:2: no image file"),
    ],
)
def test_a_broken_labels_file_names_its_line(tmp_path, text, match):
    _png(tmp_path / "a.png", 0)
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        load_image_folder(tmp_path)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "bad.png").write_text("not a png")
    with pytest.raises(DataError, match="cannot read the image .*bad.png"):
        load_image_folder(tmp_path)
