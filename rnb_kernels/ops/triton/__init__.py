"""Triton kernels, one file per op. Imported lazily by the dispatcher, never at package import."""
