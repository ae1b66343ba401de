"""Experiments built on the library: the reference training loop, ``rnb demo``, ``rnb bench``.

Nothing in the library proper imports this subpackage; it sits on top of every layer
(ops -> tracking -> mixing -> balancer/sampler -> integrations and experiments) and carries
what only experiments need: GPT-Neo models built from a config (``transformers``), an offline
tokenizer, corpus preparation (scenarios, train / validation / test / target splits),
comparisons over seeds with their statistics, plots and the benchmark harness.
"""
