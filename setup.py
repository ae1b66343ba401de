"""Build rnb_kernels, compiling its two extensions.

* ``rnb_kernels._cpu``: the CPU folds of the torch backend (csrc/cpu/), host C++ only. Built
  whenever a C++ compiler is found (with ``-fopenmp`` when it takes it); without it the torch
  backend uses ``index_add_``.
* ``rnb_kernels._C``: the CUDA kernels (csrc/*.cu), built when nvcc is available, linked
  against the static CUDA runtime so it imports on machines without a GPU.

Both are framework-free C++ plus a pybind11 binding (python/), compiled through a generated
ninja file. torch is never needed to build.

Environment:
    RNB_SKIP_CPU_BUILD=1    do not build rnb_kernels._cpu
    RNB_SKIP_CUDA_BUILD=1   do not build rnb_kernels._C
    RNB_CUDA_ARCHS="80;90"  SM architectures (default 80 and 90; "90a" enables Hopper-only code)
    CUDA_HOME / CUDA_PATH   toolkit location (else the nvcc found on PATH)
    MAX_JOBS=N              parallel compile jobs (default: CPU count)
    NVCC_APPEND_FLAGS       extra nvcc flags
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"


def _say(msg: str) -> None:
    print(f"rnb_kernels setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def find_cuda_home(nvcc: str) -> Path:
    """Toolkit root holding include/cuda_runtime_api.h (nvcc on PATH may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    raise RuntimeError(f"found nvcc at {nvcc} but no CUDA headers; set CUDA_HOME to the toolkit")


def parse_archs(spec: str) -> list[str]:
    archs = [
        a.strip().replace("sm_", "").replace(".", "") for a in spec.replace(",", ";").split(";")
    ]
    archs = [a for a in archs if a]
    for a in archs:
        if not (a.rstrip("af").isdigit()):
            raise ValueError(f"RNB_CUDA_ARCHS: cannot parse architecture {a!r} in {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest plain architecture lets future GPUs JIT the kernels.
    plain = [a for a in archs if a.isdigit()]
    if plain:
        newest = max(plain, key=int)
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


CPU_EXT = "rnb_kernels._cpu"
CUDA_EXT = "rnb_kernels._C"


def find_cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def cxx_accepts(flag: str) -> bool:
    """Whether the C++ compiler compiles and links an empty program with ``flag``."""
    cxx = find_cxx()
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        done = subprocess.run(
            [cxx, flag, str(src), "-o", str(Path(tmp) / "probe")], capture_output=True
        )
    return done.returncode == 0


def ninja_lines(
    build_dir: Path,
    out_path: Path,
    sources: list[str],
    cxx_flags: list[str],
    ldflags: list[str] | None = None,
    nvcc: str | None = None,
    nvcc_flags: list[str] | None = None,
) -> list[str]:
    """A ninja file compiling ``sources`` (``.cu`` with nvcc, the rest with the C++ compiler)
    and linking them into the shared library ``out_path``."""
    lines = [
        "ninja_required_version = 1.3",
        f"builddir = {build_dir}",  # keeps .ninja_log out of the source tree
        f"cxx = {find_cxx() or 'c++'}",
        f"cxx_flags = {' '.join(cxx_flags)}",
        f"ldflags = {' '.join(ldflags or [])}",
        "rule cxx",
        "  command = $cxx $cxx_flags -c $in -o $out",
        "  description = c++ $in",
        "rule link",
        "  command = $cxx -shared $in -o $out $ldflags",
        "  description = link $out",
    ]
    if nvcc is not None:
        lines += [
            f"nvcc = {nvcc}",
            f"nvcc_flags = {' '.join(nvcc_flags or [])}",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -c $in -o $out",
            "  description = nvcc $in",
        ]
    objects = []
    for src in sources:
        src_path = (ROOT / src).resolve()
        obj = build_dir / (src_path.name + ".o")
        rule = "nvcc" if src_path.suffix == ".cu" else "cxx"
        lines.append(f"build {obj}: {rule} {src_path}")
        objects.append(str(obj))
    lines.append(f"build {out_path}: link {' '.join(objects)}")
    return lines


def run_ninja(build_dir: Path, lines: list[str], what: str) -> None:
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        except ImportError as e:
            raise RuntimeError("building rnb_kernels needs ninja: pip install ninja") from e
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    _say(f"building {what} ({jobs} jobs)")
    subprocess.run([ninja, "-f", str(build_dir / "build.ninja"), "-j", jobs], check=True)


class NinjaCudaBuild(build_ext):
    """Compiles an extension's CUDA/C++ sources with nvcc and the host compiler via ninja."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == CPU_EXT:
            self.build_cpu(ext)
        else:
            self.build_cuda(ext)

    def _paths(self, ext: Extension, tag: str) -> tuple[Path, Path]:
        build_dir = Path(self.build_temp).resolve() / tag
        build_dir.mkdir(parents=True, exist_ok=True)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return build_dir, out_path

    def build_cpu(self, ext: Extension) -> None:
        import pybind11

        build_dir, out_path = self._paths(ext, "rnb_cpu")
        includes = [
            f"-I{ROOT / 'csrc'}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        # No -march: AVX2 code paths carry their own target attribute and are picked at run
        # time, so the library runs on any x86-64 (and builds on other architectures).
        flags = ["-O3", "-std=c++17", "-fPIC", "-Wall", "-fvisibility=hidden", *includes]
        # OpenMP lets the column fold run on PyTorch's own workers: linking libgomp.so.1, the
        # module shares the runtime torch already loaded (rnb_kernels/ops/cpu_fold.py checks
        # that before asking for threads). Without it the folds are single-threaded.
        omp = ["-fopenmp"] if cxx_accepts("-fopenmp") else []
        if not omp:
            _say(f"{find_cxx()} does not accept -fopenmp: {CPU_EXT}'s folds are single-threaded")
        lines = ninja_lines(build_dir, out_path, ext.sources, [*flags, *omp], omp)
        run_ninja(build_dir, lines, f"{CPU_EXT} with {find_cxx()}")

    def build_cuda(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        cuda_home = find_cuda_home(nvcc)
        archs = parse_archs(os.environ.get("RNB_CUDA_ARCHS", DEFAULT_ARCHS))
        import pybind11

        build_dir, out_path = self._paths(ext, "rnb_C")

        # Comma-separated: a ';' would end the shell command that ninja runs.
        arch_define = f'-DRNB_CUDA_ARCHS=\\"{",".join(archs)}\\"'
        includes = [
            f"-I{ROOT / 'csrc'}",
            f"-I{cuda_home / 'include'}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        nvcc_flags = [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-Xcompiler=-fPIC",
            "-Xcompiler=-Wall",
            "-lineinfo",
            *gencode_flags(archs),
            *shlex.split(os.environ.get("NVCC_APPEND_FLAGS", "")),
        ]
        cxx_flags = ["-O2", "-std=c++17", "-fPIC", "-Wall", "-fvisibility=hidden", arch_define]
        lib_dir = cuda_home / "lib64"
        if not lib_dir.exists():
            lib_dir = cuda_home / "lib"
        ldflags = [f"-L{lib_dir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]

        lines = ninja_lines(
            build_dir,
            out_path,
            ext.sources,
            [*cxx_flags, *includes],
            ldflags,
            nvcc,
            [*nvcc_flags, *includes],
        )
        run_ninja(build_dir, lines, f"{CUDA_EXT} with {nvcc} for sm {','.join(archs)}")


def _skipped(var: str) -> bool:
    return os.environ.get(var, "0") not in ("", "0")


def extensions() -> list[Extension]:
    exts = []
    if _skipped("RNB_SKIP_CPU_BUILD"):
        _say(
            f"RNB_SKIP_CPU_BUILD is set: not building {CPU_EXT} (the torch backend folds with index_add_)"
        )
    elif find_cxx() is None:
        _say(f"no C++ compiler found (set CXX): not building {CPU_EXT}")
    else:
        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
        exts.append(Extension(CPU_EXT, sources=[*sources, "python/cpu_bindings.cpp"]))
    if _skipped("RNB_SKIP_CUDA_BUILD"):
        _say(f"RNB_SKIP_CUDA_BUILD is set: not building {CUDA_EXT}")
    elif find_nvcc() is None:
        _say(f"nvcc not found (set CUDA_HOME): not building {CUDA_EXT}")
    else:
        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        sources += ["python/bindings.cpp"]
        exts.append(Extension(CUDA_EXT, sources=sources))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": NinjaCudaBuild})
