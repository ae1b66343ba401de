"""Plant known faults one at a time and check that the test suite fails on each.

Mutation testing (``make mutation``) measures the suite against generated one-token changes
inside a fixed selection of single-process tests. This script covers what it cannot:

* the faults an audit of the suite once planted that passed every test (the Balancer handing
  R&B counts of 1 or DGA a sign-flipped alignment, the HF trainer crediting every sample to
  domain 0, a "float64" Gram summed in float32, CI skipping what it should fail on, plain
  ``pytest`` not collecting) -- each must now make a test fail;
* mutants that survive mutmut only because the tests that kill them run several processes
  (``torch.distributed`` on gloo) or check a warning's source line, which mutmut's wrapper
  frames hide.

Every plant is a literal edit of one source line (it must match exactly once, so a refactor
that moves the line makes this script fail loudly instead of testing nothing) or a change of
environment, applied to a copy of the tracked files; the copy's selected tests must then fail
(pytest exit 1 with a ``FAILED`` test, not a collection or usage error). The same selections run
unplanted first and must pass. Results go to ``benchmarks/results/replant.md``.

Usage::

    python benchmarks/replant.py            # all plants, ~5 minutes on 2 cores
    python benchmarks/replant.py -k gram    # plants whose name contains "gram"
    python benchmarks/replant.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plant:
    name: str
    why: str
    tests: tuple[str, ...]
    path: str | None = None  # source file to edit (relative to the root)
    old: str = ""
    new: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # A component made unimportable: "triton", "sklearn" (shadowed) or "_C" / "_cpu" (import
    # refused).
    remove: str | None = None
    # Run pytest as the plain console script from this directory ("root" or "elsewhere")
    # instead of ``python -m pytest`` from the root; the check is that it *passes*.
    plain_from: str | None = None
    # The mutmut mutant this plant reproduces exactly (its full name), if any.
    mutant: str = ""


AUDIT = "audit"  # a weakness the audit proved
MUTMUT = "mutmut"  # a mutmut survivor killed outside mutmut's selection
STRICT = {"RNB_STRICT": "1"}

# A component made unimportable: (name suffix, what is hidden, test, environment, why).
# fmt: off
_MISSING = (
    ("triton", "triton", "tests/test_op_segmented_wgrad.py", STRICT,
     f"{AUDIT}: Triton missing must fail strict mode, not `importorskip`"),
    ("extra", "sklearn", "tests/test_regroup.py", STRICT,
     f"{AUDIT}: a missing extra (scikit-learn, `regroup`) must fail strict mode"),
    ("_C", "_C", "tests/test_op_dispatch.py", {},
     f"{AUDIT}: `_C` not built while nvcc is present must fail (strict mode or not)"),
    ("_cpu", "_cpu", "tests/test_cpu_fold.py", {},
     "`_cpu` (the compiled CPU folds) not built while a C++ compiler is present must "
     "fail (strict mode or not); the ops alone would fall back to `index_add_` "
     "unnoticed"),
)
# fmt: on

PLANTS: list[Plant] = [
    # ----------------------------------------------------------- the audit's planted faults
    Plant(
        "balancer-rnb-counts-of-one",
        f"{AUDIT}: the Balancer hands R&B per-domain counts of 1 (wrong means)",
        ("tests/test_wiring.py",),
        "rnb_kernels/balancer.py",
        "b.mixer.gram_coefficients(b.tracker.counts().cpu())",
        "b.mixer.gram_coefficients(torch.ones_like(b.tracker.counts().cpu()))",
    ),
    Plant(
        "balancer-counts-of-one",
        f"{AUDIT}: the `counts` statistic reports 1 per domain",
        ("tests/test_wiring.py",),
        "rnb_kernels/balancer.py",
        "        return b.tracker.counts().cpu()\n    return b.loss_counts()",
        "        return torch.ones_like(b.tracker.counts().cpu())\n    return b.loss_counts()",
    ),
    Plant(
        "balancer-dga-alignment-sign",
        f"{AUDIT}: the Balancer hands DGA the sign-flipped alignment (tracker's target row)",
        ("tests/test_wiring.py",),
        "rnb_kernels/balancer.py",
        "return b.tracker.target_alignment().cpu()",
        "return -b.tracker.target_alignment().cpu()",
    ),
    Plant(
        "balancer-dga-alignment-fn-sign",
        f"{AUDIT}: the same sign flip on the paper-style `alignment_fn` path",
        ("tests/test_wiring.py",),
        "rnb_kernels/balancer.py",
        "return b.alignment_fn()",
        "return -torch.as_tensor(b.alignment_fn())",
    ),
    Plant(
        "hf-credits-domain-0",
        f"{AUDIT}: the HF trainer credits every sample to domain 0",
        ("tests/test_hf.py",),
        "rnb_kernels/integrations/hf.py",
        "torch.as_tensor(ids)\n            .reshape(-1)",
        "torch.zeros_like(torch.as_tensor(ids))\n            .reshape(-1)",
    ),
    Plant(
        "gram-summed-in-fp32",
        f"{AUDIT}: the float64 Gram computed in float32 and cast to float64",
        ("tests/test_op_gram.py", "tests/test_wiring.py"),
        "rnb_kernels/ops/gram.py",
        "out.addmm_(ac, bc.t())",
        "out += (ac.float() @ bc.t().float()).double()",
    ),
    Plant(
        "gram-matvec-in-fp32",
        f"{AUDIT}: the Gram-vector product (what R&B reads) computed in float32",
        ("tests/test_op_gram.py", "tests/test_wiring.py"),
        "rnb_kernels/ops/gram.py",
        "c64 = c.to(torch.float64)",
        "c64 = c.to(torch.float32).to(torch.float64)\n    a = a.float()",
    ),
    Plant(
        "hash-constant",
        f"{AUDIT}: the sketch hash changed (its tests once re-derived the `known values` from "
        "the function under test; they now pin literal vectors)",
        ("tests/test_sketch_hash.py",),
        "rnb_kernels/ops/sketch_hash.py",
        "COL_MUL = 0x27D4EB2F",
        "COL_MUL = 0x27D4EB2D",
    ),
    Plant(
        "docs-output-drift",
        f"{AUDIT}: a README example's shown output no longer what the code prints (docs once "
        "disagreed with the code; every snippet now runs, `#>` lines checked)",
        ("tests/test_docs.py",),
        "README.md",
        "#> torch.float64 (16, 16) (16, 16) (16,)",
        "#> torch.float32 (16, 16) (16, 16) (16,)",
    ),
    Plant(
        "strict-missing-corpus",
        f"{AUDIT}: a missing fortunes corpus must fail CI's strict mode, not skip",
        ("tests/test_datasets.py",),
        env={"RNB_STRICT": "1", "RNB_FORTUNES_DIR": "/nonexistent/fortunes"},
    ),
    *(
        Plant(f"strict-missing-{what}", why, (test,), env=env, remove=remove)
        for what, remove, test, env, why in _MISSING
    ),
    # ----------------------------------------------------------- mutmut survivors
    # Each reproduces mutmut's mutant (named in `mutant`) exactly; the mutation report counts
    # it killed when its row here says caught.
    Plant(
        "balancer-gather-no-allreduce",
        f"{MUTMUT}: `Balancer._gather` all-reduces nothing",
        ("tests/test_distributed.py",),
        "rnb_kernels/balancer.py",
        "rdist.all_reduce_sum_([self._loss_sums, self._loss_counts])",
        "rdist.all_reduce_sum_(None)",
        mutant="rnb_kernels.balancer.xǁBalancerǁ_gather__mutmut_3",
    ),
    # Balancer.update's rank check: its argument or its name mutated (update mutants 8-13).
    *(
        Plant(
            f"balancer-check-{name}",
            f"{MUTMUT}: {why}",
            ("tests/test_distributed.py",),
            "rnb_kernels/balancer.py",
            'rdist.check_consistent(weights, "mixture weights")',
            f"rdist.check_consistent({args})",
            mutant=f"rnb_kernels.balancer.xǁBalancerǁupdate__mutmut_{n}",
        )
        for name, why, args, n in [
            ("nothing", "the ranks' weights are not compared", 'None, "mixture weights"', 8),
            ("unnamed", "the divergence error names nothing", "weights, None", 9),
            (
                "misnamed",
                "the divergence error names `XXmixture weightsXX`",
                'weights, "XXmixture weightsXX"',
                12,
            ),
            (
                "upper-case",
                "the divergence error names `MIXTURE WEIGHTS`",
                'weights, "MIXTURE WEIGHTS"',
                13,
            ),
        ]  # fmt: skip
    ),
    Plant(
        "slot-row-offset-dropped",
        f"{MUTMUT}: a vocabulary shard projected as if it began at row 0",
        ("tests/test_distributed_scale.py",),
        "rnb_kernels/tracking/slot.py",
        "check_ids=False, row_offset=self.row_offset, exact_index=heavy,",
        "check_ids=False, exact_index=heavy,",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_97",
    ),
    Plant(
        "slot-row-offset-dropped-segmented",
        f"{MUTMUT}: the same in the sketch/exact modes' segmented op",
        ("tests/test_distributed_scale.py",),
        "rnb_kernels/tracking/slot.py",
        "row_offset=self.row_offset, dw_from_domains=not (tr.bitwise_grad and need_dw),",
        "dw_from_domains=not (tr.bitwise_grad and need_dw),",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁaccumulate__mutmut_145",
    ),
    Plant(
        "slot-shard-offset-wrong-axis",
        f"{MUTMUT}: the shard's row offset read from the column axis",
        ("tests/test_distributed_scale.py",),
        "rnb_kernels/tracking/slot.py",
        "self.row_offset = int(offset[0])",
        "self.row_offset = int(offset[1])",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁbind_sharded__mutmut_42",
    ),
    Plant(
        "slot-scale-normalized-only-at-1",
        f"{MUTMUT}: buffers all-reduced in loss-scaled units",
        ("tests/test_distributed.py",),
        "rnb_kernels/tracking/slot.py",
        "        if s != 1.0:\n            for t in self.tensors(group):",
        "        if s == 1.0:\n            for t in self.tensors(group):",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁnormalize_scale__mutmut_2",
    ),
    Plant(
        "slot-scale-2-not-normalized",
        f"{MUTMUT}: a loss scale of 2 is taken for true units",
        ("tests/test_distributed.py",),
        "rnb_kernels/tracking/slot.py",
        "        if s != 1.0:\n            for t in self.tensors(group):",
        "        if s != 2.0:\n            for t in self.tensors(group):",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁnormalize_scale__mutmut_3",
    ),
    Plant(
        "slot-buffers-none-before-layout",
        f"{MUTMUT}: a DTensor head's buffers are None (not empty) before its first forward",
        ("tests/test_tracking.py::test_sharded_tracker_rounds_before_the_first_forward",),
        "rnb_kernels/tracking/slot.py",
        "self.buf: dict[str, dict[str, torch.Tensor]] = {}",
        "self.buf: dict[str, dict[str, torch.Tensor]] = None",
        mutant="rnb_kernels.tracking.slot.xǁSlotǁ__init____mutmut_34",
    ),
    Plant(
        "sampler-warning-fixed-stacklevel",
        f"{MUTMUT}: the sampler's warning at a fixed stack level, as before the fix (it then "
        "pointed into the package when drawn through iteration)",
        ("tests/test_sampling.py",),
        "rnb_kernels/sampling.py",
        "warn_at_caller(msg)",
        "__import__('warnings').warn(msg, RuntimeWarning, stacklevel=3)",
    ),
    Plant(
        "mixer-skip-warning-stacklevel",
        f"{MUTMUT}: a skipped update's warning points one frame too far (mutmut's wrapper "
        "frames hide it, so its test skips that check under mutmut)",
        ("tests/test_mixer_edges.py", "tests/test_mixer_contracts.py"),
        "rnb_kernels/mixing/base.py",
        "warnings.warn(msg, RuntimeWarning, stacklevel=3)",
        "warnings.warn(msg, RuntimeWarning, stacklevel=4)",
        mutant="rnb_kernels.mixing.base.xǁMixerǁ_skip__mutmut_14",
    ),
    # ----------------------------------------------------------- must pass, not fail
    Plant(
        "plain-pytest-from-root",
        f"{AUDIT}: plain `pytest` from the repository root collects and passes",
        ("tests/test_sampling.py",),
        plain_from="root",
    ),
    Plant(
        "plain-pytest-elsewhere",
        f"{AUDIT}: plain `pytest` from another directory collects and passes",
        ("tests/test_sampling.py",),
        plain_from="elsewhere",
    ),
]


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for ext in EXTENSIONS:  # the built extensions are not tracked
        for so in (ROOT / "rnb_kernels").glob(f"{ext}.*.so"):
            shutil.copy2(so, dst / "rnb_kernels" / so.name)


def _shadow(dirpath: Path, module: str) -> None:
    """A package named ``module`` whose import fails, first on the path."""
    pkg = dirpath / module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f'raise ImportError("{module} hidden by replant.py")\n')


EXTENSIONS = ("_C", "_cpu")

_HIDE_EXTENSION = """import sys


class _Hide:  # first on sys.meta_path: an editable install's finder would still find it
    def find_spec(self, name, path=None, target=None):
        if name == "rnb_kernels.{ext}":
            raise ImportError("rnb_kernels.{ext} hidden by replant.py")
        return None


sys.meta_path.insert(0, _Hide())
"""


def _hide_extension(dirpath: Path, ext: str) -> None:
    """A ``sitecustomize`` that makes ``import rnb_kernels.<ext>`` fail, as if not built."""
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "sitecustomize.py").write_text(_HIDE_EXTENSION.format(ext=ext))


def _run(plant: Plant, copy: Path, shadow: Path, timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ)
    env.pop("MUTANT_UNDER_TEST", None)
    env.pop("RNB_STRICT", None)
    env.update(plant.env)
    paths = [str(copy)]
    if plant.remove is not None:
        paths.insert(0, str(shadow / plant.remove))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = ["-q", "-x", "-p", "no:cacheprovider", "-rfE"]
    if plant.plain_from is None:
        cmd = [sys.executable, "-m", "pytest", *args, *plant.tests]
        cwd = copy
    else:
        # -P: no script or current directory on sys.path, as the console script runs.
        cmd = [sys.executable, "-P", "-m", "pytest", *args]
        if plant.plain_from == "root":
            cmd += list(plant.tests)
            cwd = copy
        else:
            cmd += [str(copy / t) for t in plant.tests]
            cwd = Path(tempfile.gettempdir())
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout} s\n{e.stdout or ''}"
    return rc, out, time.perf_counter() - t0


def _first_failure(out: str) -> str:
    """The first failed (or, in strict mode, errored) test or module pytest reports."""
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return m.group(1) if m else ""


STRICT_MESSAGE = "strict mode (RNB_STRICT=1): this test would have skipped"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only plants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the plants and exit")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replant.md"))
    args = ap.parse_args(argv)
    plants = [p for p in PLANTS if args.k in p.name]
    if args.list:
        for p in plants:
            print(f"{p.name:34s} {p.why}")
        return 0
    if not plants:
        ap.error(f"-k {args.k!r}: no plant matches")
    rows: list[tuple[Plant, str, str, float]] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="rnb_replant_") as tmp:
        copy, shadow = Path(tmp) / "repo", Path(tmp) / "shadow"
        copy.mkdir()
        _copy_tree(copy)
        for mod in ("triton", "sklearn"):
            _shadow(shadow / mod, mod)
        for ext in EXTENSIONS:
            _hide_extension(shadow / ext, ext)
        baseline = sorted({t for p in plants for t in p.tests})
        print(f"baseline: {' '.join(baseline)}", flush=True)
        rc, out, dt = _run(Plant("baseline", "", tuple(baseline)), copy, shadow, args.timeout * 4)
        if rc != 0:
            print(out[-4000:])
            print(f"baseline failed (exit {rc}): fix the suite before planting", file=sys.stderr)
            return 1
        print(f"baseline passed in {dt:.0f} s", flush=True)
        for p in plants:
            target = copy / p.path if p.path else None
            original = target.read_text() if target else None
            try:
                if target is not None:
                    n = original.count(p.old)
                    if n != 1:
                        raise SystemExit(f"{p.name}: {p.old!r} occurs {n} times in {p.path}")
                    target.write_text(original.replace(p.old, p.new))
                if p.remove == "_C" and not shutil.which("nvcc"):
                    # No nvcc: the extension is legitimately absent, nothing to hide.
                    print(f"--  {p.name:34s} not applicable (no nvcc)", flush=True)
                    continue
                if p.remove == "_cpu" and not shutil.which(os.environ.get("CXX", "c++")):
                    print(f"--  {p.name:34s} not applicable (no C++ compiler)", flush=True)
                    continue
                rc, out, dt = _run(p, copy, shadow, args.timeout)
            finally:
                if target is not None:
                    target.write_text(original)
            failed = _first_failure(out)
            if p.plain_from is not None:
                caught = rc == 0
                verdict = "passes" if caught else f"exit {rc}"
            elif p.env.get("RNB_STRICT"):
                # A module-level skip fails at collection (exit 2), a test-level one at set-up.
                caught = rc in (1, 2) and bool(failed) and STRICT_MESSAGE in out
            else:
                caught = rc == 1 and bool(failed)
            if p.plain_from is None:
                verdict = f"caught by {failed}" if caught else f"NOT CAUGHT (exit {rc})"
            ok &= caught
            rows.append((p, verdict, failed, dt))
            print(f"{'ok ' if caught else 'BAD'} {p.name:34s} {verdict} ({dt:.0f} s)", flush=True)
            if not caught:
                print(out[-3000:])
    _write(Path(args.out), rows, ok)
    return 0 if ok else 1


def _write(path: Path, rows, ok: bool) -> None:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = [
        "# Planted faults",
        "",
        "Produced by `python benchmarks/replant.py` (`make replant`): each row edits one source",
        "line (or the environment) in a copy of the tracked files and runs the listed tests there;",
        "a fault is caught when a test fails or errors (for the strict-mode rows: with strict",
        "mode's message, at set-up or collection). The plain-`pytest` rows must pass instead. The",
        "unplanted selections pass first.",
        "",
        f"- git {sha}{'+dirty' if dirty else ''}, {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, "
        f"Python {sys.version.split()[0]}",
        f"- result: {'every fault caught' if ok else 'SOME FAULTS NOT CAUGHT'}",
        "",
        "| plant | what it plants | mutmut mutant | tests run | result | s |",
        "|---|---|---|---|---|---:|",
    ]
    for p, verdict, _, dt in rows:
        where = f"`{p.path}`: " if p.path else ""
        tests = ", ".join(f"`{t}`" for t in p.tests)
        mutant = f"`{p.mutant}`" if p.mutant else ""
        lines.append(f"| {p.name} | {where}{p.why} | {mutant} | {tests} | {verdict} | {dt:.0f} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
