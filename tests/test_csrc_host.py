"""csrc/ on the host: tests/cpp/host_test.cpp compiles the kernels' own hash and segment-walk
code (csrc/sketch_hash.h, csrc/segments.h) with the host compiler and with nvcc, and checks it
against the Python statement of the hash and its pinned literal outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _optest import nvcc_path
from test_sketch_hash import FAR_KEY, PINNED, PINNED_FAR

from rnb_kernels.ops.reference import sketch_hash_ref

ROOT = Path(__file__).resolve().parents[1]
HOST_TEST_SRC = ROOT / "tests" / "cpp" / "host_test.cpp"


def _host_compilers():
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    return [
        pytest.param(("c++", cxx), id="c++"),
        pytest.param(("nvcc", nvcc_path()), id="nvcc"),
    ]


@pytest.fixture(scope="module", params=_host_compilers())
def host_test(request, tmp_path_factory):
    kind, compiler = request.param
    if compiler is None:
        pytest.skip(f"no {kind} compiler found")
    exe = tmp_path_factory.mktemp(f"host_test_{kind}") / "host_test"
    inc = f"-I{ROOT / 'csrc'}"
    if kind == "nvcc":
        # -x cu takes the __host__ __device__ branch of the headers, as the kernels do.
        cmd = [compiler, "-std=c++17", "-O1", "-x", "cu", "-Xcompiler=-Wall", inc]
    else:
        cmd = [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", inc]
    res = subprocess.run(
        [*cmd, str(HOST_TEST_SRC), "-o", str(exe)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return exe


def _run(exe, *args) -> str:
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _parse_hash(out: str) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor([[int(v) for v in line.split()] for line in out.splitlines()])
    return vals[:, 0], vals[:, 1].to(torch.float64)


@pytest.mark.parametrize(
    "k_out,k_in,k,seed,layer",
    [
        (1, 1, 1, 0, 0),
        (3, 5, 16, 1, 0),
        (37, 33, 8192, 0, 3),
        (33, 37, 4099, 2**32 - 1, 2**32 - 1),
        (64, 64, 2**31 - 1, 123456789, 7),
        (8, 1000, 2**32 - 1, 5, 2**31),
    ],
)
def test_host_sketch_hash_matches_reference(host_test, k_out, k_in, k, seed, layer):
    bucket, sign = _parse_hash(_run(host_test, "hash", k_out, k_in, k, seed, layer))
    ref_bucket, ref_sign = sketch_hash_ref(k_out, k_in, k, seed, layer)
    assert torch.equal(bucket, ref_bucket.reshape(-1))
    assert torch.equal(sign, ref_sign.reshape(-1))


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: "-".join(map(str, k)))
def test_host_sketch_hash_pinned(host_test, key):
    bucket, sign = _parse_hash(_run(host_test, "hash", *key))
    want_b, want_s = PINNED[key]
    assert bucket.tolist() == [v for row in want_b for v in row]
    assert sign.tolist() == [float(v) for row in want_s for v in row]


def test_host_sketch_hash_large_indices(host_test):
    # Rows/columns far beyond what a dense reference grid can hold, against pinned literals.
    k, seed, layer = FAR_KEY
    pairs = list(PINNED_FAR)
    flat = [v for p in pairs for v in p]
    bucket, sign = _parse_hash(_run(host_test, "hash_at", k, seed, layer, *flat))
    for (i, j), b, s in zip(pairs, bucket.tolist(), sign.tolist()):
        assert (b, int(s)) == PINNED_FAR[(i, j)], (i, j)


def test_host_segment_walk(host_test):
    out = _run(host_test, "segments")
    assert out.startswith("ok ") and int(out.split()[1]) > 1000, out
