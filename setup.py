"""Build of the optional compiled extension ``siss_fast._C`` (metadata lives in pyproject.toml).

What gets built:

* CPU kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) whenever torch is importable at build time and a C++
  compiler is present. The kernel sources (``csrc/cpu/*_kernel.cpp``) are compiled once per CPU capability, like
  PyTorch's DispatchStub: baseline ("default"), and on x86-64 also AVX2 (``-mavx2 -mfma -mf16c``) and AVX-512
  (``-mavx512f -mavx512bw -mavx512vl -mavx512dq``); ``csrc/cpu/dispatch.cpp`` picks one at run time;
* plus the CUDA kernels (``csrc/cuda/*.cu``) when torch is a CUDA build and nvcc is found (``CUDA_HOME``).

Anything that cannot be built is skipped with a printed reason, and the package installs as pure Python (the
``torch`` and ``triton`` backends need no compiler).

Environment switches:

* ``SISS_FAST_BUILD_EXT=auto|0|1``: 0 installs pure Python; 1 fails when the extension cannot be built.
* ``SISS_FAST_BUILD_CUDA=auto|0|1``: 0 builds the CPU kernels only; 1 fails when the CUDA kernels cannot be built.
* ``SISS_FAST_CPU_CAPABILITIES``: comma-separated extra CPU kernel builds (default on x86-64: ``avx2,avx512``;
  empty for the baseline build only). At run time AVX2 is used when the CPU has it;
  ``SISS_FAST_CPU_CAPABILITY=default|avx2|avx512`` selects another build.
* ``MAX_JOBS``: parallel compile jobs; defaults to min(cpus, GiB of memory / 3).
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures; defaults to "8.0;9.0".
* ``CUDA_HOME``: the CUDA toolkit (torch finds it from nvcc on PATH otherwise).

Build isolation hides the installed torch; build with ``pip install --no-build-isolation .`` to get the
extension (``pip install .`` with isolation installs pure Python and says so).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"siss_fast setup: {message}", file=sys.stderr, flush=True)


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "0": "0", "false": "0", "no": "0", "off": "0",
               "1": "1", "true": "1", "yes": "1", "on": "1"}
    if value not in aliases:
        raise SystemExit(f"siss_fast setup: {name} must be auto, 0 or 1, got {value!r}")
    return aliases[value]


def _default_max_jobs() -> int:
    cpus = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cpus, int(mem_gib // 3)))


def _relative(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


# Extra builds of the CPU kernel sources: capability -> compiler flags. The macros select ATen's at::vec
# specialisation (CPU_CAPABILITY_AVX2 / _AVX512, consistently for the whole translation unit) and the namespace of
# the build's symbols (SISS_CPU_CAPABILITY); csrc/cpu/dispatch.cpp checks the same CPU features at run time.
CPU_CAPABILITY_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # -Wno-maybe-uninitialized: GCC 12's own avx512fintrin.h trips it (the _mm512_undefined_* idiom).
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-Wno-maybe-uninitialized"],
}


def _capability_macros(capability: str):
    name = capability.upper()
    macros = [("SISS_CPU_CAPABILITY", name), ("CPU_CAPABILITY", name)]
    if capability != "default":
        macros.append((f"CPU_CAPABILITY_{name}", None))
    return macros


def _cpu_capabilities():
    """The extra CPU kernel builds: AVX2 and AVX-512 on x86-64 with a GCC-compatible compiler (not MSVC)."""
    requested = os.environ.get("SISS_FAST_CPU_CAPABILITIES")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if requested is None:
        if not x86 or os.name == "nt":
            return []
        return list(CPU_CAPABILITY_FLAGS)
    names = [n.strip().lower() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_CAPABILITY_FLAGS]
    if unknown:
        raise SystemExit(f"siss_fast setup: SISS_FAST_CPU_CAPABILITIES: unknown {unknown}, expected a subset of "
                         f"{list(CPU_CAPABILITY_FLAGS)}")
    if names and not x86:
        raise SystemExit(f"siss_fast setup: SISS_FAST_CPU_CAPABILITIES={requested} needs an x86-64 machine")
    return names


def _build_ext_with_cpu_capabilities(base):
    """``base`` (torch's BuildExtension) plus one compile of the CPU kernel sources per capability.

    setuptools has one set of flags per Extension; the per-capability objects are compiled here with the
    extension's own flags plus the capability's, each into its own folder (so with its own ninja file), and linked
    after the extension's objects: the baseline objects come first, so for an inline function that several builds
    emit (a header's std:: or c10:: helper) the linker keeps the baseline copy, never an AVX one.
    """

    class BuildExtension(base):
        def build_extension(self, ext):
            kernel_sources = getattr(ext, "siss_cpu_kernel_sources", None)
            if kernel_sources:
                cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else \
                    list(ext.extra_compile_args)
                objects = []
                for capability in ["default", *ext.siss_cpu_capabilities]:
                    flags = [*cxx, *CPU_CAPABILITY_FLAGS.get(capability, [])]
                    objects += self.compiler.compile(
                        kernel_sources,
                        output_dir=os.path.join(self.build_temp, f"cpu_{capability}"),
                        macros=[*ext.define_macros, *_capability_macros(capability)],
                        include_dirs=ext.include_dirs,
                        debug=self.debug,
                        extra_postargs={"cxx": flags, "nvcc": []},
                        depends=ext.depends,
                    )
                ext.extra_objects = [*objects, *[o for o in ext.extra_objects if o not in objects]]
            super().build_extension(ext)

    return BuildExtension


def _extension_build():
    """Returns (ext_modules, cmdclass); ([], {}) for a pure-Python install."""
    build_ext = _switch("SISS_FAST_BUILD_EXT")
    build_cuda = _switch("SISS_FAST_BUILD_CUDA")

    def skip(reason: str):
        if build_ext == "1":
            raise SystemExit(f"siss_fast setup: SISS_FAST_BUILD_EXT=1 but the extension cannot be built: {reason}")
        _log(f"skipping the compiled extension ({reason}); installing pure Python "
             "(backends 'torch' and 'triton' remain available)")
        return [], {}

    if build_ext == "0":
        _log("SISS_FAST_BUILD_EXT=0: installing pure Python without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return skip(f"torch is not importable at build time ({exc}); with build isolation, "
                    "use `pip install --no-build-isolation .`")

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return skip("no C++ compiler found (set CXX or install g++)")

    want_cuda = build_cuda != "0"
    cuda_problem = None
    if want_cuda:
        if torch.version.cuda is None:
            cuda_problem = f"torch {torch.__version__} is not a CUDA build"
        elif cpp_extension.CUDA_HOME is None:
            cuda_problem = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    with_cuda = want_cuda and cuda_problem is None
    if build_cuda == "1" and not with_cuda:
        raise SystemExit(f"siss_fast setup: SISS_FAST_BUILD_CUDA=1 but CUDA kernels cannot be built: {cuda_problem}")
    if build_cuda == "0":
        _log("SISS_FAST_BUILD_CUDA=0: building the CPU kernels only")
    elif not with_cuda:
        _log(f"building the CPU kernels only: {cuda_problem}")

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    cpu_dir = ROOT / "csrc" / "cpu"
    kernel_sources = _relative(cpu_dir.glob("*_kernel.cpp"))
    sources = _relative([ROOT / "csrc" / "ops.cpp",
                         *(p for p in cpu_dir.glob("*.cpp") if not p.name.endswith("_kernel.cpp"))])
    depends = _relative([*(ROOT / "csrc").rglob("*.h"), *(ROOT / "csrc").rglob("*.cuh"), *map(ROOT.joinpath,
                                                                                               kernel_sources)])
    cpu_capabilities = _cpu_capabilities()
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    # No -std flag: torch adds the standard its headers need (C++20 since torch 2.10, C++17 before).
    cxx_flags = ["-O3", "-g0", "-Wno-unknown-pragmas", *openmp]
    link_flags = [*openmp]
    define_macros = [(f"SISS_FAST_CPU_{c.upper()}", None) for c in cpu_capabilities]
    extra_compile_args = {"cxx": cxx_flags}

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _relative((ROOT / "csrc" / "cuda").glob("*.cu"))
        define_macros.append(("SISS_FAST_WITH_CUDA", None))
        # No --use_fast_math: it replaces exp/log/division with approximations and would break the fp32 bar.
        extra_compile_args["nvcc"] = ["-O3", "-DSISS_FAST_WITH_CUDA", "-lineinfo"]
        extension_cls = cpp_extension.CUDAExtension
        _log(f"building CPU + CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
             f"MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        extension_cls = cpp_extension.CppExtension
        _log(f"building CPU kernels (torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})")
    _log(f"CPU kernel builds: {', '.join(['default', *cpu_capabilities])}")

    extension = extension_cls(
        name="siss_fast._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
        depends=depends,
    )
    extension.siss_cpu_kernel_sources = kernel_sources
    extension.siss_cpu_capabilities = cpu_capabilities
    build_ext_cls = _build_ext_with_cpu_capabilities(cpp_extension.BuildExtension.with_options(use_ninja=True))
    cmdclass = {"build_ext": build_ext_cls}
    return [extension], cmdclass


ext_modules, cmdclass = _extension_build()

setup(
    packages=[*find_packages(include=["siss_fast", "siss_fast.*"]), "siss_fast.kernels"],
    package_dir={"siss_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
