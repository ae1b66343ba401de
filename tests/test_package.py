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


def test_regroup_is_callable_after_importing_the_subpackage():
    """`from rnb_kernels.regroup import Partition` binds the subpackage to `rnb.regroup`; the
    README's `rnb.regroup(texts, ...)` must still work (it raised TypeError before)."""
    code = (
        "import rnb_kernels as rnb\n"
        "from rnb_kernels.regroup import Partition\n"
        "texts = ['a cat sat', 'the dog ran', 'a cat ran', 'dogs bark loud', 'cats purr', 'dog']\n"
        "part = rnb.regroup(texts, k=2, embedder='tfidf', seed=0)\n"
        "print(isinstance(part, Partition), part.k, part.labels.shape)"
    )
    assert _run_python(code).strip() == "True 2 (6,)"


def test_core_imports_load_no_experiment_code():
    """The library proper never imports the experiments (train loop, demo, benchmarks)."""
    core = ["rnb_kernels", "rnb_kernels.ops", "rnb_kernels.tracking", "rnb_kernels.mixing",
            "rnb_kernels.sampling", "rnb_kernels.balancer", "rnb_kernels.regroup",
            "rnb_kernels.distributed", "rnb_kernels.datasets"]  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "import rnb_kernels as rnb\n"
        "for n in rnb.__all__: getattr(rnb, n)\n"
        "print(sorted(m for m in sys.modules if m.startswith('rnb_kernels.experiments')))"
    )
    assert _run_python(code).strip() == "[]"


def test_mixer_is_exported_and_every_mixer_builds_with_num_domains():
    import rnb_kernels as rnb

    assert rnb.Mixer is rnb.mixing.Mixer
    ctx = rnb.MixingContext(num_domains=3, eval_proportions=[1, 1, 2], domain_sizes=[5, 3, 2])
    hparams = {"dga": {"step_size": 1.0}, "dga-distribution": None}
    for name in rnb.mixer_names():
        if hparams.get(name, {}) is None:
            continue  # needs bases; covered in test_mixing
        mixer = rnb.build_mixer(name, ctx, **hparams.get(name, {}))
        assert mixer.num_domains == 3 and mixer.name == name
        cls = type(mixer)
        kwargs = {"eval_proportions": [1, 1, 2]} if name == "rnb" else hparams.get(name, {})
        assert cls(num_domains=3, **kwargs).num_domains == 3
    assert rnb.Static(num_domains=2).weights.tolist() == [0.5, 0.5]
    assert rnb.Static([1, 3]).weights.tolist() == [0.25, 0.75]
    assert rnb.build_mixer("static", ctx).weights.tolist() == [0.5, 0.3, 0.2]  # natural
    with pytest.raises(ValueError, match="weights has 2 entries but num_domains=3"):
        rnb.Static([1, 3], num_domains=3)
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        rnb.build_mixer("nope", ctx)
    with pytest.raises(ValueError, match="needs MixingContext.eval_proportions"):
        rnb.build_mixer("rnb", rnb.MixingContext(num_domains=3))
