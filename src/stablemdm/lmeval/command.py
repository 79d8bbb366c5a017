"""`stablemdm lm-eval ARGS`: register the `stablemdm` model in lm-eval, then run lm-eval's
own command line on ARGS (lm-eval 0.4.13 discovers no model plugins by entry point, so the
model is registered in the process that runs it, as LLaDA's evaluator script does)."""

from __future__ import annotations

import sys

from ..errors import ConfigError

INSTALL = 'pip install "stablemdm[lm-eval]"'


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's exit status on `argv` (its `run` arguments, or a subcommand: `ls tasks`)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ConfigError(f"lm-eval is not installed; install it with {INSTALL}") from None
    from . import model  # noqa: F401  (registers the `stablemdm` model)

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:  # lm-eval's own usage errors and --help
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0
