"""The lm-eval model: a stablemdm run, or a Hugging Face model as it is (`loading`),
evaluated by EleutherAI's lm-evaluation-harness (`lm-eval` 0.4.x, the optional extra
`stablemdm[lm-eval]`), as LLaDA's `eval_llada.py` wraps LLaDA, with the likelihood of
`stablemdm.likelihood` (its standard error and passes in a side file) and the library's
decoding (docs/likelihood.md, "lm-eval").

A thin adapter at the top of the layers, beside the CLI: nothing else imports it, and
`import stablemdm` never imports lm-eval. `stablemdm lm-eval ARGS` registers the model and
hands ARGS to lm-eval's own command line (`command.run_lm_eval`); in Python, importing
`stablemdm.lmeval.model` registers it.
"""
