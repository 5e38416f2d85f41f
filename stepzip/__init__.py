"""The step-entropy method, with no engine and no web framework.

Steps (`segment`), compression variants, grading, prompts and answer cues, token pieces,
the GRPO reward's arithmetic, data loading and the method's constants live here, so the
server, the trainer and the clients share one definition of each. Nothing in this package
imports vLLM, FastAPI or torch (`tests/unit/test_boundaries.py` checks it).
"""
