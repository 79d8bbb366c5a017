"""Text-to-image tasks on image tokens (the paper's multimodal row at CPU scale): the prompt is
a caption ("a handwritten 3"), the response the image's canvas of VQ tokens.

`digits_t2i` uses scikit-learn's digits; `image_folder_t2i` a folder of PNGs with a label per
image (`data.images`). The images are split into disjoint train, test and classifier parts;
the codebook is fitted on the train part only, and the classifier part is kept for the judge
of generated images (`evaluation.image_scoring`), so the judge has never seen what the MDM
trained on. A decoded response scores when it is a whole canvas of image tokens; how well
the images match their prompts is measured by the image scorer that `evaluate` applies to
every image task (class share, mean class probability, Frechet distance, a PNG grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DataError, Example, TextTokenizer
from ..data.image_tokens import ImageTokenizer, image_tokenizer_for, read_canvas, spell
from ..data.images import ImageSet, load_digits_set, load_image_folder, split_images
from ..data.vq import Codebook, fingerprint, fit_codebook
from .registry import Task, check_split, register_task

_CACHE: dict[tuple, tuple[dict[str, ImageSet], Codebook]] = {}


class ImageTask(Task):
    """Captions to image-token canvases over the splits of an `ImageSet`.

    `quantiser` "kmeans" (`codebook_size` centres over `patch` x `patch` patches) or "grey"
    (`codebook_size` grey levels, patch 1); `prompt_template` is formatted with the class
    name as `label` (an image's own caption, when it has one, wins); `temperature` is the
    decoding temperature `evaluate` uses unless told otherwise (sampling gives the diversity
    a text-to-image model needs; 0 would draw one image per prompt); `constrain` decodes only
    image tokens into the canvas and `<eos>` after it, as MMaDA and MaskGIT do (false: any
    token, and the scorer counts the canvases that are not whole images).
    """

    def __init__(
        self,
        images: ImageSet,
        key: tuple,
        *,
        test_size: float,
        classifier_size: float,
        seed: int,
        quantiser: str,
        codebook_size: int,
        patch: int,
        prompt_template: str,
        temperature: float,
        constrain: bool,
    ) -> None:
        if "{label}" not in prompt_template:
            raise ValueError(
                f"task {self.name!r}: prompt_template={prompt_template!r} must contain {{label}}"
            )
        if temperature < 0:
            raise ValueError(f"task {self.name!r}: temperature={temperature} must be >= 0")
        key = (*key, test_size, classifier_size, seed, quantiser, codebook_size, patch)
        if key not in _CACHE:
            splits = split_images(images, test_size, classifier_size, seed)
            about = f"{len(splits['train'])} train images of {images.name}"
            codebook = fit_codebook(
                splits["train"].pixels, quantiser, codebook_size, patch, seed, about
            )
            _CACHE[key] = (splits, codebook)
        self._images, self.codebook = _CACHE[key]
        self.class_names = list(images.class_names)
        self.prompt_template = prompt_template
        self.temperature = float(temperature)
        self.constrain = bool(constrain)
        self._examples = {s: self._encode(s) for s in ("train", "test")}
        self.gen_length = self.codebook.n_tokens + 1  # the canvas and its <eos>
        prompts = [e.prompt for split in self._examples.values() for e in split]
        self.max_length = max(map(len, prompts)) + 1 + self.gen_length

    def _encode(self, split: str) -> list[Example]:
        """The examples of a split: caption -> spelled canvas, answer = the class name."""
        part = self._images[split]
        codes = self.codebook.encode(part.pixels)  # [N, T]
        out = []
        for i, label in enumerate(part.labels):
            name = self.class_names[label]
            prompt = part.captions[i] or self.prompt_template.format(label=name)
            source = f"{self.name} {split} ({part.sources[i]})"
            out.append(Example(prompt, spell(codes[i]), name, source, {"label": int(label)}))
        return out

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._examples[split])

    def real_images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The real images `[N, H, W]` and labels `[N]` of "train", "test" or "classifier"."""
        if split not in self._images:
            raise ValueError(f"unknown image split {split!r}; use one of {list(self._images)}")
        part = self._images[split]
        return part.pixels, part.labels

    def extract(self, output: str) -> str | None:
        """The canvas in `output` spelled canonically, or None unless it is exactly one whole
        canvas of this codebook's image tokens."""
        codes, exact = read_canvas(output, self.codebook.n_tokens)
        return spell(codes) if exact and (codes < self.codebook.size).all() else None

    def score(self, output: str, example: Example) -> bool:
        """Whether `output` is a whole image (its match to the prompt is the image scorer's)."""
        return self.extract(output) is not None

    def image_of(self, output: str) -> np.ndarray:
        """The image `[H, W]` of a decoded response; positions without an image token blank."""
        codes, _ = read_canvas(output, self.codebook.n_tokens)
        return self.codebook.decode(codes[None])[0]

    def canvas_tokens(self, tokenizer: ImageTokenizer) -> list[list[int]] | None:
        """The ids decoding may put at each canvas position: the image block, then `<eos>`
        (None with constrain=false: any token)."""
        if not self.constrain:
            return None
        return [tokenizer.image_ids] * self.codebook.n_tokens + [[tokenizer.eos_token_id]]

    def tokenizer_for(self, tokenizer: TextTokenizer | None) -> ImageTokenizer:
        """The character tokenizer plus this task's image block (built-in model), a Hugging
        Face tokenizer holding the image tokens, or a saved run's, checked to carry this
        task's codebook (one from another run is refused)."""
        return image_tokenizer_for(tokenizer, self.codebook, f"task {self.name!r}")


@register_task("digits_t2i")
class DigitsT2I(ImageTask):
    """scikit-learn's 8x8 handwritten digits; by default 2x2 patches, 64 k-means codes: a
    canvas of 16 image tokens. Splits: 300 test, 500 classifier, the other 997 train."""

    def __init__(
        self,
        test_size: float = 300,
        classifier_size: float = 500,
        seed: int = 0,
        quantiser: str = "kmeans",
        codebook_size: int = 64,
        patch: int = 2,
        prompt_template: str = "a handwritten {label}",
        temperature: float = 1.0,
        constrain: bool = True,
    ) -> None:
        super().__init__(
            load_digits_set(),
            ("digits",),
            test_size=test_size,
            classifier_size=classifier_size,
            seed=seed,
            quantiser=quantiser,
            codebook_size=codebook_size,
            patch=patch,
            prompt_template=prompt_template,
            temperature=temperature,
            constrain=constrain,
        )


@register_task("image_folder_t2i")
class ImageFolderT2I(ImageTask):
    """A folder of same-size PNGs with a label (and optionally a caption) per image, as
    `data.images.load_image_folder` reads it; 15% test and 25% classifier by default."""

    def __init__(
        self,
        path: str | Path,
        test_size: float = 0.15,
        classifier_size: float = 0.25,
        seed: int = 0,
        quantiser: str = "kmeans",
        codebook_size: int = 64,
        patch: int = 2,
        prompt_template: str = "a {label}",
        temperature: float = 1.0,
        constrain: bool = True,
    ) -> None:
        images = load_image_folder(path)
        if len(images.class_names) < 2:
            raise DataError(f"{path}: one class only ({images.class_names[0]}); need two or more")
        content = fingerprint(
            pixels=images.pixels, labels=images.labels, captions=images.captions, path=path
        )
        key = ("folder", content)
        super().__init__(
            images,
            key,
            test_size=test_size,
            classifier_size=classifier_size,
            seed=seed,
            quantiser=quantiser,
            codebook_size=codebook_size,
            patch=patch,
            prompt_template=prompt_template,
            temperature=temperature,
            constrain=constrain,
        )
