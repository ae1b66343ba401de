"""Experiments built on the library: the reference training loop, ``rnb demo``, ``rnb bench``.

Nothing in the library proper imports this subpackage; it sits on top of every layer
(ops -> tracking -> mixing -> balancer/sampler -> integrations and experiments) and carries
what only experiments need: a small GPT, an offline tokenizer, corpus preparation, plots and
the benchmark harness.
"""
