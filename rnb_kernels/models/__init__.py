"""Models used by the demo, the benchmarks and the tests."""

from .gpt import GPT, IGNORE_INDEX, GPTConfig, per_sample_loss, per_token_loss

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "per_sample_loss", "per_token_loss"]
