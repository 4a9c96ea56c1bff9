#!/usr/bin/env bash
# CUDA compile lane: builds siss_fast._C with its CUDA kernels (sm_90) against a CUDA build of torch in a venv of
# its own, imports it, and checks that the siss_fast::*_ext operators have CUDA kernels. No GPU is needed (none is
# used): this proves the .cu files compile and link, and that the CUDA registrations load.
#
# Env: SISS_CUDA_VENV (default /tmp/siss-cuda-venv; reused when it already has torch 2.14.1),
#      CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SISS_CUDA_VENV:-/tmp/siss-cuda-venv}"
build_dir="$(mktemp -d /tmp/siss-cuda-lane.XXXXXX)"
trap 'rm -rf "$build_dir"' EXIT
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export SISS_FAST_BUILD_EXT=1 SISS_FAST_BUILD_CUDA=1
start=$SECONDS

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]] && ! command -v nvcc >/dev/null; then
  echo "cuda_lane: no nvcc (CUDA_HOME=$CUDA_HOME); cannot compile the CUDA kernels" >&2
  exit 1
fi

if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
  echo "cuda_lane: creating $venv with torch 2.14.1 (CUDA build)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 numpy setuptools wheel ninja
fi
echo "cuda_lane: venv ready after $((SECONDS - start)) s"
"$venv/bin/python" -c 'import torch; print("cuda_lane: torch", torch.__version__, "CUDA", torch.version.cuda)'
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

# Build out of tree so the lane never replaces the CPU extension built in the source tree.
build_start=$SECONDS
(cd "$repo" && "$venv/bin/python" setup.py --quiet build_ext \
    --build-temp "$build_dir/temp" --build-lib "$build_dir/lib")
echo "cuda_lane: extension built in $((SECONDS - build_start)) s"

# Import the built module with the package from the source tree and check the CUDA registrations.
cp -r "$repo/siss_fast" "$build_dir/pkg_siss_fast"
mkdir -p "$build_dir/site"
mv "$build_dir/pkg_siss_fast" "$build_dir/site/siss_fast"
rm -f "$build_dir/site/siss_fast"/_C*.so
cp "$build_dir"/lib/siss_fast/_C*.so "$build_dir/site/siss_fast/"
(cd "$build_dir" && PYTHONPATH="$build_dir/site" "$venv/bin/python" - <<'EOF'
import torch
from siss_fast import _extension as ext

info = ext.build_info()
print("cuda_lane: build_info", info)
assert ext.available(), ext.failure_reason()
assert ext.cuda_available(), "extension built without CUDA kernels"
for name in ("mixture_noise_ext", "siss_loss_forward_ext", "siss_loss_backward_ext"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"siss_fast::{name}", key), (name, key)
# The CPU kernels of this build still run (no GPU needed).
x = torch.randn(2, 4, 8, 8)
g = torch.tensor([0.5, 0.9]); s = (1 - g * g).sqrt()
out = ext.ops().siss_loss_forward(x, x, torch.zeros_like(x), torch.ones_like(x), g, s, 0.5, None)
assert all(torch.isfinite(t).all() for t in out)
if torch.cuda.is_available():
    xc = x.cuda(); gc, sc = g.cuda(), s.cuda()
    outc = ext.ops().siss_loss_forward(xc, xc, torch.zeros_like(xc), torch.ones_like(xc), gc, sc, 0.5, None)
    for a, b in zip(out, outc):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=0)
    print("cuda_lane: ran the CUDA kernels on", torch.cuda.get_device_name())
print("cuda_lane: CUDA ops registered: OK")
EOF
)
echo "cuda_lane: done in $((SECONDS - start)) s"
