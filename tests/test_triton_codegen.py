"""Ahead-of-time GPU code generation of every Triton kernel, on a machine without a GPU.

Each kernel of ``kernels/`` (see ``kernels.KERNELS``) is compiled with ``triton.compile`` for an sm_90 (H100/H200)
target, in every dtype variant the backend supports (fp32, fp16, bf16, bf16 predictions with fp32 latents, fp64),
plus every autotune candidate of the elementwise kernels and the integer-1 specialisation Triton's JIT applies to
scalar arguments equal to 1 (B = 1, D = 1, one chunk). The pipeline runs through TTIR, TTGIR, LLVM IR and PTX to
``ptxas`` (bundled with Triton) and a cubin, so a kernel that would not compile on the GPU fails here.

``TRITON_INTERPRET=1`` (used by the rest of the suite) makes ``@triton.jit`` return interpreter objects that cannot
be compiled, so the compilation runs in a subprocess with that variable removed from its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

_COMPILE_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys, traceback
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    import kernels

    target = GPUTarget("cuda", 90, 32)
    results = {}

    def compile_case(case, spec, variant, constexprs=None, num_warps=None, ones=()):
        pred, latent, acc = kernels.DTYPE_VARIANTS[variant]
        names = {"*pred": "*" + pred, "*latent": "*" + latent, "*acc": "*" + acc}
        signature = {k: names.get(v, v) for k, v in spec["signature"].items()}
        consts = dict(spec["constexprs"], **(constexprs or {}))
        for name in ones:  # Triton's JIT specialises integer arguments equal to 1 as constexprs
            signature[name] = "constexpr"
            consts[name] = 1
        try:
            src = triton.compiler.ASTSource(fn=spec["kernel"], signature=signature, constexprs=consts)
            options = {"num_warps": num_warps or spec["num_warps"]}
            compiled = triton.compile(src, target=target, options=options)
            asm = compiled.asm
            results[case] = {
                "ok": True,
                "stages": sorted(asm.keys()),
                "cubin_bytes": len(asm.get("cubin", b"")),
                "ptx_target": "sm_90" in asm.get("ptx", ""),
                "n_regs": getattr(compiled, "n_regs", None),
            }
        except Exception:
            results[case] = {"ok": False, "error": traceback.format_exc()[-3000:]}

    for spec in kernels.KERNELS:
        name = spec["name"]
        for variant in kernels.DTYPE_VARIANTS:
            compile_case(f"{name}[{variant}]", spec, variant)
        for i, cfg in enumerate(spec.get("autotune", [])):
            compile_case(f"{name}[fp32,autotune{i}]", spec, "fp32", cfg["constexprs"], cfg["num_warps"])
        ones = [k for k, v in spec["signature"].items() if v == "i32"]
        compile_case(f"{name}[fp32,ints=1]", spec, "fp32", ones=ones)
    print("@@RESULTS@@" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def compile_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    marker = "@@RESULTS@@"
    if marker not in proc.stdout:
        pytest.fail(
            f"the compile subprocess failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(proc.stdout.split(marker, 1)[1])


def _expected_cases():
    """Case names, computed without importing the kernels in this (possibly interpreted) process."""
    variants = ["fp32", "fp16", "bf16", "bf16_pred_fp32_latents", "fp64"]
    names = ["mixture_noise_kernel", "siss_partials_kernel", "siss_finish_kernel", "siss_backward_kernel"]
    cases = [f"{n}[{v}]" for n in names for v in variants]
    cases += [f"{n}[fp32,ints=1]" for n in names]
    return cases


@pytest.mark.parametrize("case", _expected_cases())
def test_kernel_compiles_for_sm90(compile_results, case):
    assert case in compile_results, f"{case} was not compiled; compiled: {sorted(compile_results)}"
    result = compile_results[case]
    assert result["ok"], f"{case} does not compile for sm_90:\n{result['error']}"
    assert {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(result["stages"])
    assert result["ptx_target"], "the PTX does not target sm_90"
    assert result["cubin_bytes"] > 0, "ptxas produced no cubin"


def test_every_kernel_and_autotune_config_compiles(compile_results):
    """Everything the subprocess compiled (including every autotune candidate) succeeded, and every kernel of
    ``kernels.KERNELS`` is covered by the parametrised cases above."""
    failed = {k: v["error"] for k, v in compile_results.items() if not v["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    kernel_names = {case.split("[", 1)[0] for case in compile_results}
    expected = {case.split("[", 1)[0] for case in _expected_cases()}
    assert kernel_names == expected, f"kernels.KERNELS lists {sorted(kernel_names)}, tests expect {sorted(expected)}"
    assert any("autotune" in case for case in compile_results), "no autotune candidate was compiled"
