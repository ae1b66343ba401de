"""Packaging contract: cheap import, no hardware probing at import, CLI, build settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout


def test_import_is_lazy():
    """`import rnb_kernels` must not load Triton, the extension or any optional extra."""
    heavy = ["triton", "rnb_kernels._C", "sklearn", "sentence_transformers", "transformers"]
    code = (
        "import sys, rnb_kernels\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
        "print(sys.modules['torch'].cuda.is_initialized())"
    )
    loaded, cuda_init = _run_python(code).split("\n")[:2]
    assert loaded == "[]", loaded
    assert cuda_init == "False"


def test_public_names_resolve():
    import rnb_kernels as rnb

    for name in rnb.__all__:
        assert getattr(rnb, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        _ = rnb.not_a_thing


def test_backends_cli():
    out = subprocess.run(
        [sys.executable, "-m", "rnb_kernels.cli", "backends"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == ["cuda", "triton", "torch"]


def test_arch_parsing_and_gencode():
    sys.path.insert(0, str(ROOT))
    try:
        import importlib

        spec = importlib.util.spec_from_file_location("rnb_setup", ROOT / "setup.py")
        src = (ROOT / "setup.py").read_text().split("\nsetup(")[0]  # definitions only
        ns: dict = {"__file__": spec.origin, "__name__": "rnb_setup"}
        exec(compile(src, spec.origin, "exec"), ns)
    finally:
        sys.path.remove(str(ROOT))
    assert ns["parse_archs"]("80;90") == ["80", "90"]
    assert ns["parse_archs"]("sm_90a, 8.0") == ["90a", "80"]
    with pytest.raises(ValueError, match="RNB_CUDA_ARCHS"):
        ns["parse_archs"]("hopper")
    flags = " ".join(ns["gencode_flags"](["80", "90a"]))
    assert "arch=compute_90a,code=sm_90a" in flags
    assert "code=compute_80" in flags  # PTX only for the newest plain arch
