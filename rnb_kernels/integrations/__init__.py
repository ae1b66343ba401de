"""Integrations with training frameworks (``hf``: Hugging Face ``transformers.Trainer``).

Each integration imports its framework lazily, on first use of the submodule.
"""
