"""Text-to-image on image tokens end to end: the task and its shared vocabulary, prompt tokens
never masked, a tiny run trained, decoded, scored and drawn, every estimator and the variance
tool on it, a codebook from another run refused, and a multimodal custom-code model through
`model=`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_fixtures import custom_code_model, llama_tokenizer
from PIL import Image

from stablemdm.cli import main
from stablemdm.data import encode_examples
from stablemdm.data.image_tokens import ImageTokenizer
from stablemdm.errors import ConfigError
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.rates import Uniform
from stablemdm.estimators.stratified import Stratified
from stablemdm.evaluation.decoding import generate_arm, generate_mdm
from stablemdm.evaluation.scoring import evaluate
from stablemdm.tasks import get_task
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_mmada"
OPTIONS = "task_options={codebook_size: 16}"
TINY = [
    "task=digits_t2i",
    OPTIONS,
    "model_preset=tiny",
    "d_model=32",
    "n_layers=1",
    "per_device_train_batch_size=8",
    "max_steps=3",
    "save_steps=3",
    "logging_steps=1",
    "disable_tqdm=true",
    "ppots_sequences=4",
    "ppots_rates=4",
    "ppots_masks=2",
]


@pytest.fixture(scope="module")
def task():
    return get_task("digits_t2i", codebook_size=16)


def test_prompt_is_a_caption_and_the_response_a_canvas_of_image_tokens(task):
    example = task.examples("train")[0]
    assert example.prompt == f"a handwritten {example.answer}"
    tok = task.tokenizer_for(None)
    ids = tok.encode_response(example)
    image = range(*tok.blocks["image"])
    assert len(ids) == task.gen_length == 17 and ids[-1] == tok.eos_token_id
    assert all(i in image for i in ids[:-1])
    assert all(i not in image for i in tok.encode_prompt(example))
    assert tok.blocks["text"] == (0, 100) and tok.vocab_size == 100 + 16
    assert tok.decode(tok.encode_prompt(example) + ids) == example.prompt + example.response
    assert tok.token_id("<img_3>", where="x") == tok.blocks["image"][0] + 3
    assert len(task.examples("train")) == 997 and len(task.examples("test")) == 300


def test_grey_quantiser_spells_one_token_per_pixel():
    task = get_task("digits_t2i", quantiser="grey", codebook_size=4, patch=1)
    assert task.gen_length == 65
    assert task.tokenizer_for(None).vocab_size == 100 + 4


def test_a_grey_codebook_is_refused_for_another_split():
    """The grey levels are the same for every split, but a model trained on seed 0's train
    images must not be judged on seed 1's test and judge images, which hold many of them."""
    grey = dict(quantiser="grey", codebook_size=4, patch=1)
    first, other = (get_task("digits_t2i", seed=seed, **grey) for seed in (0, 1))
    seen = {image.tobytes() for image in first.real_images("train")[0]}
    held_out = [*other.real_images("test")[0], *other.real_images("classifier")[0]]
    assert sum(image.tobytes() in seen for image in held_out) > 300
    trained = first.tokenizer_for(None)  # what a run on seed 0 saves
    with pytest.raises(ConfigError, match=r"codebook \(grey, 4 codes.* is from another run"):
        other.tokenizer_for(trained)
    assert get_task("digits_t2i", seed=0, **grey).tokenizer_for(trained) is trained


class _Recorder(torch.nn.Module):
    """A model that remembers every input and predicts uniformly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.inputs = vocab, []
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return self.bias.expand(*input_ids.shape, self.vocab)


@pytest.mark.parametrize(
    "rate,masking,scheme",
    [
        ("t", "iid", None),
        ("t", "mirror", None),
        ("count", "mirror", "strats"),
        ("t", "iid", "strats"),
    ],
)
def test_prompt_tokens_are_never_masked(task, rate, masking, scheme):
    tok = task.tokenizer_for(None)
    batch = encode_examples(task.examples("train")[:64], tok, task.max_length, task.gen_length)
    sampler = Stratified(Uniform()) if scheme else Uniform()
    objective = Objective(tok.mask_token_id, rate=rate, masking=masking, sampler=sampler)
    model = _Recorder(tok.vocab_size)
    for i in range(20):
        objective(
            model, batch, torch.Generator().manual_seed(i), torch.Generator().manual_seed(99 + i)
        )
    masked = torch.cat([x == tok.mask_token_id for x in model.inputs])  # [copies * B, L]
    copies = len(masked) // len(batch["eligible"])  # MIRROR passes two masked copies
    prompt = (~batch["eligible"] & batch["attention_mask"]).repeat(copies, 1)
    assert prompt.any(dim=1).all() and not (masked & prompt).any()
    assert masked.any(dim=0)[batch["eligible"][0]].all()  # every canvas position masked


def test_constrained_decoding_draws_whole_canvases(task):
    """With uniform logits over all 116 tokens, unconstrained decoding scatters text tokens
    into the canvas; the image task's constraint gives 16 image tokens and `<eos>`."""
    tok = task.tokenizer_for(None)
    model = _Recorder(tok.vocab_size)
    prompts = [tok.encode_prompt(e) for e in task.examples("test")[:6]]
    special = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=1.0)
    mdm = dict(mask_token_id=tok.mask_token_id, gen_length=17, steps=17, block_length=17)
    outputs = {}
    for canvas in (task.canvas_tokens(tok), None):
        g = torch.Generator().manual_seed(0)
        outputs[canvas is None] = [
            *generate_mdm(model, prompts, **mdm, **special, generator=g, canvas_tokens=canvas),
            *generate_arm(
                model, prompts, max_new_tokens=17, **special, generator=g, canvas_tokens=canvas
            ),
        ]
    image = set(tok.image_ids)
    assert all(len(out) == 16 and set(out) <= image for out in outputs[False])
    assert not all(set(out) <= image and len(out) == 16 for out in outputs[True])
    with pytest.raises(ValueError, match="canvas_tokens lists 17 positions for a canvas of 9"):
        generate_arm(
            model,
            prompts,
            max_new_tokens=9,
            **special,
            generator=g,
            canvas_tokens=task.canvas_tokens(tok),
        )
    assert get_task("digits_t2i", codebook_size=16, constrain=False).canvas_tokens(tok) is None


def test_a_tiny_run_trains_decodes_scores_and_draws(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, [*TINY, f"output_dir={out}"]))
    assert (out / "codebook.json").is_file() and (out / "checkpoint-3" / "codebook.json").is_file()
    model, tok = load_checkpoint(out)
    assert isinstance(tok, ImageTokenizer) and tok.vocab_size == model.config.vocab_size
    result = evaluate(
        model,
        tok,
        get_task("digits_t2i", codebook_size=16),
        limit=20,
        output_path=tmp_path / "eval.jsonl",
    )
    assert result.n == 20 and set(result.metrics) == {"mean_prob", "fid", "valid"}
    assert (tmp_path / "eval.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert result.accuracy == sum(r["correct"] for r in records) / 20
    assert all(r["extracted"] == r["predicted"] for r in records)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(out),
                "--task",
                "digits_t2i",
                "--task-option",
                "codebook_size=16",
                "--limit",
                "12",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["n"] == 12 and "fid" in printed and "mean_prob" in printed
    assert printed["grid"] == str(out / "eval-digits_t2i-test.png")  # the result names it
    assert (out / "eval-digits_t2i-test.png").is_file()


def test_sampling_gives_different_images_for_one_prompt(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, [*TINY, f"output_dir={out}"]))
    model, tok = load_checkpoint(out)
    task = get_task("digits_t2i", codebook_size=16)
    sampled = evaluate(model, tok, task, limit=8)
    greedy = evaluate(model, tok, task, limit=8, temperature=0.0)
    same_prompt = [r["output"] for r in greedy.records if r["gold"] == greedy.records[0]["gold"]]
    assert len({r["output"] for r in sampled.records}) > 1
    assert len(set(same_prompt)) == 1


@pytest.mark.parametrize(
    "method",
    [
        ["sampler=ppots", "masking=mirror"],
        ["scheme=stratified"],
        ["rate=count", "sampler=ppots", "masking=mirror", "compute_matched=true"],
        ["sampler=ema"],
        ["objective=arm"],
    ],
)
def test_every_estimator_trains_on_image_tokens(tmp_path, method):
    result = train(load_config(None, [*TINY, f"output_dir={tmp_path}", *method]))
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert result.global_step == 3 and len(losses) == 3
    assert all(0 < loss < 20 for loss in losses)


def test_the_variance_tool_runs_on_image_tokens(tmp_path):
    args = [
        "variance",
        *[
            a
            for a in TINY
            if a.startswith(("task", "model_preset", "d_model", "n_layers", "ppots"))
        ],
        "--methods=ppots_mirror,count",
        "--sequences=4",
        "--rates=2",
        "--masks=2",
        "--grad-sequences=2",
        "--grad-rates=2",
        "--grad-masks=2",
        "--draws=3",
        "--batch=2",
        "--bootstrap=0",
        "--grid=3",
        "--grid-sequences=2",
        "--grid-masks=2",
        f"--output={tmp_path / 'variance'}",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "variance" / "variance.json").read_text())
    assert {"standard", "ppots_mirror", "count"} <= set(report["decomposition"])


def test_generate_draws_an_image_runs_outputs_as_a_png(tmp_path, capsys):
    """`generate --png` on an image run: whole canvases, sampled at the task's temperature
    (two draws for one prompt differ), drawn one row per distinct prompt; refused in one
    line for a text run and for an existing file without --overwrite."""
    out, png = tmp_path / "run", tmp_path / "samples.png"
    train(load_config(None, [*TINY, "max_steps=1", "save_steps=1", f"output_dir={out}"]))
    capsys.readouterr()
    prompts = ["a handwritten 3", "a handwritten 3", "a handwritten 7"]
    argv = ["generate", str(out), *(f"--prompt={p}" for p in prompts), f"--png={png}"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    task = get_task("digits_t2i", codebook_size=16)
    assert len(lines) == 3 and all(task.extract(line) for line in lines)
    assert lines[0] != lines[1]
    with Image.open(png) as image:
        assert image.format == "PNG"
    assert main(argv) == 2
    assert "--png" in capsys.readouterr().err and png.is_file()
    text = tmp_path / "text"
    train(load_config(None, [*TINY[2:], "max_steps=1", "save_steps=1", f"output_dir={text}"]))
    capsys.readouterr()
    assert main(["generate", str(text), "--prompt=1+2", f"--png={tmp_path / 'x.png'}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--png draws the images of a text-to-image run" in line


def test_a_codebook_from_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, [*TINY, "max_steps=1", "save_steps=1", f"output_dir={out}"]))
    capsys.readouterr()
    argv = ["eval", str(out), "--task", "digits_t2i", "--task-option", "codebook_size=32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "codebook (kmeans, 16 codes" in err and "is from another run" in err
    assert "task_options" in err
    other = [a for a in TINY if a != OPTIONS]
    config = load_config(
        None,
        [
            *other,
            "task_options={codebook_size: 16, seed: 1}",
            f"init_from={out}",
            f"output_dir={tmp_path / 'next'}",
        ],
    )
    with pytest.raises(ConfigError, match="init_from=.* is from another run"):
        train(config)


def test_an_image_folder_task_trains(tmp_path):
    from PIL import Image

    for cls, value in (("dark", 40), ("light", 210)):
        for i in range(12):
            pixels = np.full((4, 4), value + 3 * i, dtype=np.uint8)
            (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(tmp_path / "data" / cls / f"{i}.png")
    sizes = "codebook_size: 4, test_size: 4, classifier_size: 6"
    options = f"task_options={{path: {tmp_path / 'data'}, {sizes}}}"
    args = [a for a in TINY if not a.startswith("task")]
    out = tmp_path / "run"
    train(load_config(None, [*args, "task=image_folder_t2i", options, f"output_dir={out}"]))
    model, tok = load_checkpoint(out)
    task = get_task(
        "image_folder_t2i",
        path=str(tmp_path / "data"),
        codebook_size=4,
        test_size=4,
        classifier_size=6,
    )
    assert task.examples("test")[0].prompt in ("a dark", "a light") and task.gen_length == 5
    result = evaluate(model, tok, task)
    assert result.n == 4 and result.metrics["fid"] is not None


def _mmada(folder: Path, codebook_size: int) -> Path:
    """The multimodal custom-code fixture: a Llama-like text tokenizer with LLaDA's mask token
    and `<img_0>` ... image tokens appended, one embedding over both."""
    tok = llama_tokenizer(chat=False, mask=True)
    text_size = len(tok)
    tok.add_tokens([f"<img_{k}>" for k in range(codebook_size)])
    values = {"llm_vocab_size": text_size, "codebook_size": codebook_size}
    return custom_code_model(FIXTURE, folder, tok, **values)


def test_a_multimodal_hf_model_trains_and_decodes_through_model(tmp_path, capsys):
    folder = _mmada(tmp_path / "mmada", 16)
    out = tmp_path / "run"
    args = [
        "train",
        f"model={folder}",
        "trust_remote_code=true",
        *[a for a in TINY if not a.startswith(("model_preset", "d_model", "n_layers"))],
        "sampler=ppots",
        "masking=mirror",
        f"output_dir={out}",
    ]
    assert main(args) == 0
    model, tok = load_checkpoint(out, trust_remote_code=True)
    text = len(llama_tokenizer(chat=False, mask=True))
    assert tok.blocks["image"] == (text, text + 16)  # the model's own image tokens
    assert model.get_input_embeddings().num_embeddings == text + 16  # one embedding
    capsys.readouterr()
    argv = [
        "eval",
        str(out),
        "--task",
        "digits_t2i",
        "--task-option",
        "codebook_size=16",
        "--limit",
        "10",
        "--trust-remote-code",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["n"] == 10 and 0 <= printed["valid"] <= 1
    assert (out / "eval-digits_t2i-test.png").is_file()

    def prefer_image_5(module, args, logits):  # the head's row of image token 5 wins
        logits = logits.clone()
        logits[..., text + 5] += 100.0
        return logits

    model.head.register_forward_hook(prefer_image_5)
    result = evaluate(model, tok, get_task("digits_t2i", codebook_size=16), limit=4)
    assert all(r["output"].startswith("<img_5>" * 16) for r in result.records)


def test_a_hf_model_without_image_tokens_is_one_line(tmp_path, capsys):
    folder = _mmada(tmp_path / "mmada", 4)  # four image tokens, the task needs sixteen
    args = [
        "train",
        f"model={folder}",
        "trust_remote_code=true",
        *[a for a in TINY if not a.startswith(("model_preset", "d_model", "n_layers"))],
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(args) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if "error" in e]
    assert len(errors) == 1 and "has no image token <img_4>" in errors[0]
    assert str(folder) in errors[0]
