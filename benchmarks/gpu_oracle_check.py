"""The oracle suite on GPU tensors for the ``cuda`` and ``triton`` backends (run by gpu_suite.sh before the timings).

    python benchmarks/gpu_oracle_check.py [--backends cuda,triton] [--quick|--tiny] [--out results/gpu-oracle.json]
    python benchmarks/gpu_oracle_check.py --device cpu --backends cpp --tiny       # checks the script itself

Every case goes through the public API (``sf.siss_loss`` with ``reduction="none"``, its autograd with an upstream
gradient that is not 1, and ``sf.mixture_noise``) and is compared with the float64 oracles of
:mod:`siss_fast.testing`, with the bars of SPEC §9: fp32 relative error <= 1e-5 on losses and weights (1e-10 for fp64);
fp16/bf16 at most 2x the error of the plain-PyTorch reference (backend ``torch``) in the same dtype on the same
device, plus a floor of 1e-5 (the fp32 bar: every backend computes in fp32 from inputs that are exact in fp32, so
plain PyTorch's own error can be far below fp32 rounding and 2x it alone is no bar); gradients by whole-tensor relative error with the same rule (floor 2 ulp of pred's
dtype). Exit status 1 when any case fails. Timings mean nothing unless this passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts a bare checkout on sys.path if siss_fast is not installed)
import kernel_bench as K  # noqa: E402
import torch  # noqa: E402

SHAPES = [((1, 4, 64, 64), None), ((3, 4, 17, 23), None), ((2, 3, 256, 256), None), ((16, 4, 64, 64), None),
          ((4, 4, 64, 64), 999), ((5, 3, 7), 10)]
QUICK_SHAPES = [((3, 4, 17, 23), None), ((4, 4, 64, 64), 999), ((16, 4, 64, 64), None)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LOW_PRECISION_FLOOR = 1e-5
TINY_SHAPES = [((3, 4, 17, 23), None), ((2, 4, 8, 8), 999)]
LAMBDAS = [(0.5, None), (0.0, 30.0), (1.0, 30.0), (0.25, 5.0)]


def _tolerance(dtype: torch.dtype, plain_err: float, floor: float) -> float:
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 2.0 * plain_err + floor


def _run_loss(backend: str, c, lambd, clip, g_x, g_a):
    import siss_fast as sf

    sf.set_backend(backend)
    pred = c["pred"].detach().clone().requires_grad_(True)
    terms = sf.siss_loss(pred, c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], lambd, weight_clip=clip,
                         reduction="none")
    (terms.loss_x * g_x).sum().add_((terms.loss_a * g_a).sum()).backward()
    mixed = sf.mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    return terms, pred.grad, mixed


def check(backends, shapes, device: torch.device, seed: int = 0):
    from siss_fast import testing as T

    results = []
    for backend in backends:
        ok, why, _ = K.backend_status(backend, device, 0)
        if not ok:
            results.append({"backend": backend, "status": "skipped", "why": why})
            print(f"{backend}: skipped ({why})")
            continue
        for shape, t in shapes:
            for dtype in DTYPES:
                for lambd, clip in LAMBDAS:
                    c = T.make_case(shape, t=t, dtype=dtype, seed=seed, device=device)
                    gen = torch.Generator().manual_seed(seed + 1)
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    g_x = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).to(acc).to(device)
                    g_a = (-torch.rand(shape[0], generator=gen, dtype=torch.float64) - 0.5).to(acc).to(device)
                    got, grad, mixed = _run_loss(backend, c, lambd, clip, g_x, g_a)
                    plain, plain_grad, plain_mixed = _run_loss("torch", c, lambd, clip, g_x, g_a)
                    want = T.oracle_siss_loss(c["pred"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"],
                                              lambd, clip)
                    want_grad = T.oracle_grad(c["pred"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"],
                                              lambd, clip, g_x, g_a)
                    want_mixed = T.oracle_mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"],
                                                        c["mask"])
                    tiny = torch.finfo(torch.float32).tiny
                    errs, tols = {}, {}
                    for name, g, p, w in zip(("loss_x", "loss_a", "weight_x", "weight_a"), got, plain, want):
                        errs[name] = T.max_rel_error(g, w, floor=tiny)
                        tols[name] = _tolerance(dtype, T.max_rel_error(p, w, floor=tiny), LOW_PRECISION_FLOOR)
                    eps = torch.finfo(dtype).eps
                    errs["grad"] = T.norm_rel_error(grad, want_grad)
                    tols["grad"] = _tolerance(dtype, T.norm_rel_error(plain_grad, want_grad), 2 * eps)
                    errs["mixture_noise"] = T.norm_rel_error(mixed, want_mixed)
                    tols["mixture_noise"] = {torch.float64: 1e-14, torch.float32: 1e-6}.get(
                        dtype, max(2 * eps, 2 * T.norm_rel_error(plain_mixed, want_mixed)))
                    failed = [k for k in errs if not errs[k] <= tols[k]]
                    row = {"backend": backend, "shape": list(shape), "t": t, "dtype": H.dtype_name(dtype),
                           "lambd": lambd, "weight_clip": clip, "errors": errs, "tolerances": tols,
                           "status": "FAIL" if failed else "ok", "failed": failed}
                    results.append(row)
                    if failed:
                        detail = ", ".join(f"{k} {errs[k]:.3g} > {tols[k]:.3g}" for k in failed)
                        print(f"FAIL {backend} {H.shape_name(shape)} t={t} {row['dtype']} lambda={lambd} "
                              f"clip={clip}: {detail}", flush=True)
        import siss_fast as sf

        sf.set_backend("auto")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="two tiny shapes (smoke pass)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only to check this script itself (e.g. --device cpu --backends cpp in the smoke pass)")
    args = p.parse_args(argv)
    device = H.setup(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = check(backends, TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else SHAPES,
                    device)
    checked = [r for r in results if r["status"] in ("ok", "FAIL")]
    failed = [r for r in results if r["status"] == "FAIL"]
    for backend in sorted({r["backend"] for r in results}):
        mine = [r for r in checked if r["backend"] == backend]
        if mine:
            worst = {k: max(r["errors"][k] / max(r["tolerances"][k], 1e-300) for r in mine) for k in mine[0]["errors"]}
            print(f"{backend}: {len(mine)} cases, {sum(r['status'] == 'FAIL' for r in mine)} failed; "
                  "worst error/tolerance: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = H.machine_header(device)
        args.out.write_text(json.dumps({"header": header, "results": results}, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if not checked:
        print("no backend could be checked", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
