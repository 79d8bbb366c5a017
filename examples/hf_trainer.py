"""stablemdm as a library: build a Hugging Face MDM, its data, the P-POTS+MIRROR objective and
the Trainer yourself, train, save, reload and decode (what `stablemdm train` does for you).

    python examples/hf_trainer.py --output runs/example                # a tiny Llama built here
    python examples/hf_trainer.py --output runs/example --model PATH --steps 200

`--model` takes any local causal LM (adapted), masked LM (BERT, no chat template) or MDM.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stablemdm.data import canvas_lengths, encode_examples
from stablemdm.data.hf_tokenizer import HFTokenizer
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots_fit import FitDesign, fit_ppots
from stablemdm.estimators.rates import Uniform
from stablemdm.estimators.stratified import Stratified
from stablemdm.evaluation.decoding import generate
from stablemdm.models.hf import load_hf_model, load_trained
from stablemdm.models.toy import save_llama
from stablemdm.rng import seeded_generator
from stablemdm.tasks.registry import get_task
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.datasets import TensorDataset, collate
from stablemdm.training.trainer import StableMDMTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the run")
    parser.add_argument("--model", help="a local Hugging Face model (default: a tiny Llama)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    args = parser.parse_args()
    out = Path(args.output)
    if args.model is None:
        args.model = str(out / "base")
        save_llama(args.model, "tiny")

    # 1. the model, adapted to an MDM: a causal LM gets bidirectional attention, a model
    # without a mask token a new one; a masked LM (BERT) is used as it is
    model, hf_tokenizer, spec = load_hf_model(args.model, objective="mdm", add_mask_token=True)
    chat = bool(getattr(hf_tokenizer, "chat_template", None))  # BERT has no chat template
    tokenizer = HFTokenizer(hf_tokenizer, spec.mask_token_id, chat_template=chat)

    # 2. the data: prompts (by the chat template if there is one; never masked), responses +
    # EOS fill (scored)
    task = get_task("chain_sum", n_train=256, n_test=8)
    examples = task.examples("train")
    max_length, gen_length = canvas_lengths(examples, tokenizer)
    data = TensorDataset(encode_examples(examples, tokenizer, max_length, gen_length))

    # 3. the estimator: P-POTS fitted on a few sequences (checked on a few others), MIRROR masks
    fit_batch = data[list(range(4))]
    check_batch = data[list(range(4, 8))]
    plain = Objective(mask_token_id=spec.mask_token_id, sampler=Uniform())
    density = fit_ppots(
        plain,
        model,
        fit_batch,
        check_batch,
        generator=torch.Generator().manual_seed(0),
        design=FitDesign(counts=8, masks=2, mix=0.1),
    )
    objective = Objective(mask_token_id=spec.mask_token_id, sampler=density, masking="mirror")

    # 4. the Trainer: a config dataclass and the Trainer subclass that calls the objective
    config = StableMDMConfig(
        output_dir=str(out / "run"),
        model=args.model,
        add_mask_token=spec.mask_token_added,
        chat_template=chat,
        sampler="ppots",
        masking="mirror",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    eval_objective = Objective(mask_token_id=spec.mask_token_id, sampler=Stratified(Uniform()))
    trainer = StableMDMTrainer(
        model=model,
        args=config,
        train_dataset=data,
        data_collator=collate,  # TensorDataset hands over whole batches
        objective=objective,
        eval_objective=eval_objective,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    losses = [round(r["loss"], 3) for r in trainer.state.log_history if "loss" in r]
    print(f"trained {trainer.state.global_step} steps; losses {losses}")

    # 5. reload and decode the test prompts (LLaDA-style low-confidence remasking)
    model, hf_tokenizer, spec = load_trained(config.output_dir)
    tokenizer = HFTokenizer(hf_tokenizer, spec.mask_token_id, chat_template=chat)
    test = task.examples("test")
    outputs = generate(
        model,
        [tokenizer.encode_prompt(e) for e in test],
        objective="mdm",
        mask_token_id=spec.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        gen_length=gen_length,
        steps=gen_length,
        block_length=gen_length,
        generator=seeded_generator(0, "decode"),
    )
    for example, tokens in zip(test, outputs, strict=True):
        print(f"{example.prompt} -> {tokenizer.decode(tokens)!r} (gold {example.answer})")


if __name__ == "__main__":
    main()
