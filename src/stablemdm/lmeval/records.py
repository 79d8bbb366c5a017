"""The side file of the lm-eval model (`records=PATH`): one JSON line per request with the
standard error and passes that lm-eval's own results have no field for, rewritten whole
(atomically) after each batch of requests, and a one-line summary on stderr."""

from __future__ import annotations

import math
import sys
from typing import Any

from ..data import write_jsonl
from ..likelihood import Likelihood
from ..training.outputs import check_output_file


class Records:
    """Per-request records, written to `path` (checked as a new output unless `overwrite`;
    never inside the run folder `run`) when it is given, kept in memory otherwise."""

    def __init__(self, path: str | None, overwrite: bool, run: str) -> None:
        self.path = None
        if path is not None:
            self.path = check_output_file(
                path, overwrite=overwrite, reads=[run], flag="--model_args records="
            )
        self.rows: list[dict[str, Any]] = []

    def add(self, request: Any, kind: str, result: Likelihood, **extra: Any) -> None:
        """One request's estimate: its task, document and the Likelihood fields."""
        self.rows.append(
            {
                "request_type": kind,
                "task": request.task_name,
                "doc_id": request.doc_id,
                "idx": request.idx,
                "value": result.value,
                "se": result.se,
                "passes": result.passes,
                "draws": result.draws,
                "estimator": result.estimator,
                **extra,
            }
        )

    def flush(self, kind: str, count: int) -> None:
        """Write the file, and summarise the last `count` records of `kind` on stderr."""
        if self.path is not None:
            write_jsonl(self.path, self.rows)
        last = [r for r in self.rows[len(self.rows) - count :] if r["request_type"] == kind]
        if not last:
            return
        passes = sum(r["passes"] for r in last)
        worst = max(r["se"] for r in last)
        where = f"; per request in {self.path}" if self.path else " (records=PATH keeps each)"
        print(
            f"stablemdm lm-eval: {len(last)} {kind} requests, {passes} forward passes "
            f"({passes / len(last):.1f} per request), largest standard error {worst:.4g} "
            f"nats{where}",
            file=sys.stderr,
        )


def summed(results: list[Likelihood]) -> Likelihood:
    """The log-likelihood of a document from its windows' independent estimates: the sum,
    its errors added in quadrature."""
    estimator = results[0].estimator if results else "exact"
    return Likelihood(
        value=sum(r.value for r in results),
        se=math.sqrt(sum(r.se**2 for r in results)),
        passes=sum(r.passes for r in results),
        draws=sum(r.draws for r in results),
        estimator=estimator,
    )
