"""Benchmarks behind ``rnb bench``: ``mixing`` (method quality and cost) and ``overhead``
(end-to-end step time of gradient tracking against the usual anchors)."""
