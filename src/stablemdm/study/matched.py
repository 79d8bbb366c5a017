"""`standard_matched`: Standard at the training compute of the study's most expensive method.

A two-pass estimator (MIRROR, P-POTS+MIRROR) sends every sequence through the network twice,
so against Standard it also buys twice the compute. `standard_matched` is Standard given the
training forward passes of the study's most expensive method: a larger batch
(`per_device_train_batch_size` x k, `matched_by: batch`, the default, when that is a whole
number of sequences) or more steps (`max_steps` x k, rounded: `matched_by: steps`, or when
the batch cannot carry k). The report compares every method with it as well as with Standard
(docs/study.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from ..errors import ConfigError

MATCHED = "standard_matched"
MATCHED_BY = ("batch", "steps")


def matched_budget(
    costs: Mapping[str, int], standard: int, batch: int, steps: int, by: str, where: str
) -> dict[str, int]:
    """standard_matched's overrides from each method's training forward passes (`costs`) and
    Standard's (`standard`), its per-device `batch` and `steps`: the batch or steps times
    k = the most expensive method's passes over Standard's."""
    name, most = max(costs.items(), key=lambda item: item[1])
    if most <= standard:
        raise ConfigError(
            f"{where}: {MATCHED} runs Standard at the training compute of the study's most "
            f"expensive method, and none costs more than Standard (the most: {name}): remove it"
        )
    k = Fraction(most, standard)
    if by == "batch" and (batch * k).denominator == 1:
        return {"per_device_train_batch_size": int(batch * k)}
    return {"max_steps": round(steps * k)}
