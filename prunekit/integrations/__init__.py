"""Bridges to other tools (optional dependencies, imported only on demand).

* :mod:`prunekit.integrations.lm_eval`: evaluate any prunekit model with EleutherAI's
  lm-evaluation-harness (``pip install "prunekit[lm-eval]"``; see ``docs/lm-eval.md``).
"""
