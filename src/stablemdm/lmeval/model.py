"""`StableMDMLM`, registered in lm-eval as `stablemdm`: a stablemdm run behind lm-eval's
model API (its `LM`), as LLaDA's `eval_llada.py` wraps LLaDA.

- `loglikelihood`: the adaptive ELBO of `stablemdm.likelihood`, the choices of one question
  (same task, document and context) drawn with common random numbers; an ARM's exact value;
  a block-diffusion run's block ELBO, in the blocks it trained on.
- `loglikelihood_rolling`: a document's log-likelihood bound, the sum of the ELBOs of
  lm-eval's rolling windows of the model's length.
- `generate_until`: the library's decoding (`evaluation.decoding.generate`) with its steps
  and block options, cut at the task's stop sequences.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..errors import ConfigError
from ..evaluation.decoding import generate
from ..likelihood import Choices, Likelihood, loglikelihood, loglikelihood_choices
from ..rng import seeded_generator
from ..training.saved import objective_of
from .loading import load_model
from .options import parse_options
from .records import Records, summed
from .requests import (
    Question,
    cut_at_stops,
    encode_pair,
    fit_context,
    group_questions,
    rolling_windows,
    text_encoder,
)

NAME = "stablemdm"
DEFAULT_GEN_LENGTH = 256  # lm-eval's max_gen_toks when a task names none
SAMPLING_KEYS = ("until", "max_gen_toks", "temperature", "do_sample")


def _device(asked: str | None) -> torch.device:
    """lm-eval's `--device` (it passes cuda:0 unless told), the CPU where there is no CUDA."""
    if asked is None or (str(asked).startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device(asked)


@register_model(NAME)
class StableMDMLM(LM):
    """A stablemdm run or a Hugging Face model (`--model_args run=FOLDER,...` or
    `pretrained=NAME_OR_PATH,...`, see `options.Options`) as an lm-eval model; lm-eval's
    `--batch_size` is the number of prompts decoded together."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.options, self.generation_batch = parse_options(kwargs)
        self.source = self.options.run or self.options.pretrained
        self.model, self.tokenizer, self.limit = load_model(self.options)
        self._device = _device(kwargs.get("device"))
        self.model.to(self._device).eval()
        self.objective = objective_of(self.model)
        self.encode = text_encoder(self.tokenizer)
        self.prefix = self.tokenizer.eos_token_id  # the context of an empty one (lm-eval's)
        self.records = Records(self.options.records, self.options.overwrite, self.source)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix], self.encode(continuation)
        return encode_pair(self.encode, context, continuation)

    def _kind(self) -> str:
        """The likelihood's kind: "arm" (exact), "mdm" or "block" (its own blocks)."""
        return self.objective

    def _choices(self, question: Question) -> Choices:
        """The question's continuations scored together (common random numbers)."""
        longest = max(question.continuations, key=len)
        return loglikelihood_choices(
            self.model,
            fit_context(question.context, longest, self.limit),
            question.continuations,
            generator=seeded_generator(self.options.seed, "lm-eval", *question.key),
            estimator=self.options.estimator,
            budget=self.options.budget(),
            mask_token_id=self.tokenizer.mask_token_id,
            kind=self._kind(),
        )

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is it the greedy continuation) per request."""
        pairs = [self._pair(*r.args) for r in requests]
        keys = [(r.task_name, r.doc_id, r.args[0]) for r in requests]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        questions = group_questions(keys, pairs)
        for question in tqdm(questions, desc="stablemdm loglikelihood", disable=disable_tqdm):
            choices = self._choices(question)
            gap_se = choices.gap_se if len(question.indices) > 1 else None
            for i, continuation, result in zip(
                question.indices, question.continuations, choices.results, strict=True
            ):
                out[i] = (result.value, self._is_greedy(question.context, continuation))
                extra = {"choices": len(question.indices), "gap_se": gap_se}
                self.records.add(requests[i], "loglikelihood", result, **extra)
        self.records.flush("loglikelihood", len(requests))
        return out

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether greedy decoding of len(continuation) tokens gives it (`greedy_check`);
        False without the check, as LLaDA's evaluator by default."""
        if not self.options.greedy_check:
            return False
        n = len(continuation)
        context = fit_context(context, continuation, self.limit)
        generator = torch.Generator().manual_seed(self.options.seed)
        decoded = self._decode([context], n, 0.0, generator, steps=n, block_length=n)
        return decoded[0] == continuation

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood bound: the sum of its windows' ELBOs (exact for an
        ARM); the windows' standard errors add in quadrature in the records."""
        if self.limit is None or self.limit < 2:
            raise ConfigError(
                f"lm-eval model stablemdm: {self.source} names no length (a run's max_length "
                "in its config.yaml, or the model's positions), which perplexity windows need: "
                "give one as max_length=N in --model_args"
            )
        out = []
        for request in tqdm(requests, desc="stablemdm rolling", disable=disable_tqdm):
            result = self._document(request)
            self.records.add(request, "loglikelihood_rolling", result)
            out.append(result.value)
        self.records.flush("loglikelihood_rolling", len(requests))
        return out

    def _document(self, request: Any) -> Likelihood:
        windows = rolling_windows(self.encode(request.args[0]), self.prefix, self.limit)
        key = (self.options.seed, "lm-eval-rolling", request.task_name, request.doc_id)
        return summed(
            [
                loglikelihood(
                    self.model,
                    context,
                    continuation,
                    generator=seeded_generator(*key, w),
                    estimator=self.options.estimator,
                    budget=self.options.budget(),
                    mask_token_id=self.tokenizer.mask_token_id,
                    kind=self._kind(),
                )
                for w, (context, continuation) in enumerate(windows)
            ]
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's decoded continuation, cut at the first of its stop sequences; the
        requests of one set of generation options are decoded in batches."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="stablemdm generate", disable=disable_tqdm)
        for indices in groups.values():
            stops, gen_length, temperature = self._generation_kwargs(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.generation_batch):
                batch = indices[start : start + self.generation_batch]
                prompts = [self._prompt(requests[i].args[0], gen_length) for i in batch]
                generator = seeded_generator(self.options.seed, "lm-eval-generate", batch[0])
                decoded = self._decode(prompts, gen_length, temperature, generator)
                for i, ids in zip(batch, decoded, strict=True):
                    out[i] = cut_at_stops(self.tokenizer.decode(ids), stops)
                bar.update(len(batch))
        bar.close()
        return out

    def _generation_kwargs(self, kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        """(stop sequences, tokens to generate, temperature) of a request's gen_kwargs;
        sampling options the decoder has not (top_p, ...) are named once on stderr."""
        ignored = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if ignored:
            print(f"stablemdm lm-eval: gen_kwargs {ignored} are not used", file=sys.stderr)
        until = kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        wanted = self.options.gen_length or int(kwargs.get("max_gen_toks", DEFAULT_GEN_LENGTH))
        sample = kwargs.get("do_sample", True)
        temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
        room = wanted if self.limit is None else min(wanted, self.limit - 1)
        return stops, room if self.objective != "arm" else wanted, temperature

    def _prompt(self, context: str, gen_length: int) -> list[int]:
        """The context's latest tokens that leave the canvas room (an ARM slides its window)."""
        ids = self.encode(context) if context else [self.prefix]
        if self.limit is None:
            return ids
        room = self.limit if self.objective == "arm" else self.limit - gen_length
        return ids[-room:]

    def _decode(
        self,
        prompts: list[list[int]],
        gen_length: int,
        temperature: float,
        generator: torch.Generator,
        steps: int | None = None,
        block_length: int | None = None,
    ) -> list[list[int]]:
        """`generate` with the run's decoder: an ARM's, or an MDM's (`steps` and
        `block_length` from the options, else gen_length: one token per step, one block) or
        a block-diffusion model's (its own blocks)."""
        tokenizer = self.tokenizer
        common = {
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "temperature": temperature,
            "generator": generator,
        }
        if self.objective == "arm":
            arm = {"max_new_tokens": gen_length, "context_length": self.limit}
            return generate(self.model, prompts, objective="arm", **arm, **common)
        full = self.objective == "mdm"
        steps = steps or self.options.steps or (gen_length if full else None)
        block_length = block_length or self.options.block_length or (gen_length if full else None)
        return generate(
            self.model,
            prompts,
            objective=self.objective,
            mask_token_id=tokenizer.mask_token_id,
            gen_length=gen_length,
            steps=steps,
            block_length=block_length if full else self.options.block_length,
            remasking=self.options.remasking,
            **common,
        )
