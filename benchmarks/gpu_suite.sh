#!/usr/bin/env bash
# The GPU pass, for a CUDA machine without network access, in under 8 minutes (about 4 with --quick):
#   1. build the CUDA extension in place (for this GPU's architecture only),
#   2. the GPU tests (pytest -m cuda tests/) and the oracle suite on GPU tensors with the cuda and triton backends,
#   3. the GPU benchmarks (every provider side by side), JSON + markdown under ${OUT:-benchmarks/results},
#   4. the engine step benchmark with a Stable Diffusion v1 sized UNet (bench_engine.py --sd-v1; ENGINE=0 skips it).
# Usage:  bash benchmarks/gpu_suite.sh [--quick]        env: PYTHON (default python), OUT, MAX_JOBS, BUDGET_S (480)
# Every step has a time limit taken from what is left of BUDGET_S; a benchmark cut short keeps the rows it finished
# (the scripts rewrite their JSON after each shape/dtype group). Exit status: 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [--quick]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results}"
BUDGET_S="${BUDGET_S:-480}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled Triton kernels on the GPU, never the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below is what gets tested
start=$(date +%s)
status=0
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s elapsed, $(left) s left)"; }
run_limited() {  # run_limited SECONDS LOG cmd...: run with a time limit, tee to LOG, record failure
  local limit="$1" log="$2"; shift 2
  if [ "$limit" -lt 10 ]; then echo "skipped: time budget spent" | tee "$log"; status=1; return 1; fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "!!! timed out after ${limit} s: $*" || echo "!!! failed (rc=$rc): $*"
    status=1
  fi
  return "$rc"
}

step "0. machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>/dev/null || true
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None); sys.exit(0 if torch.cuda.is_available() else 1)"
} | tee "$OUT/gpu-machine.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then echo "no CUDA device visible to torch: nothing to do"; exit 1; fi

step "1. build the CUDA extension in place"
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
NCPU="$(nproc)"
run_limited $(( $(left) - 240 )) "$OUT/gpu-build.log" env SISS_FAST_BUILD_EXT=1 SISS_FAST_BUILD_CUDA=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" MAX_JOBS="${MAX_JOBS:-$NCPU}" \
  "$PY" setup.py build_ext --inplace >/dev/null || tail -n 40 "$OUT/gpu-build.log"
"$PY" -c "import siss_fast._extension as e; print('extension:', e.build_info()); assert e.cuda_available(), e.failure_reason()" \
  2>&1 | tee -a "$OUT/gpu-build.log" || status=1

step "2a. GPU tests: pytest -m cuda tests/"
run_limited $(( ($(left) - 200) / 2 )) "$OUT/gpu-tests.log" "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider

step "2b. oracle suite on GPU tensors, backends cuda and triton"
run_limited $(( $(left) - 200 )) "$OUT/gpu-oracle.log" "$PY" benchmarks/gpu_oracle_check.py --backends cuda,triton \
  $QUICK --out "$OUT/gpu-oracle.json"

step "3. GPU benchmarks"
stamp="$(date -u +%Y%m%d-%H%M)"
run_limited $(( $(left) / 3 )) "$OUT/gpu-mixture_noise.log" "$PY" benchmarks/bench_mixture_noise.py --device cuda $QUICK \
  --out "$OUT/gpu-mixture_noise-$stamp.json"
run_limited $(( $(left) - 5 )) "$OUT/gpu-siss_loss.log" "$PY" benchmarks/bench_siss_loss.py --device cuda $QUICK \
  --out "$OUT/gpu-siss_loss-$stamp.json"

step "4. engine step benchmark, Stable Diffusion v1 sized UNet (random weights; ENGINE=0 skips)"
if [ "${ENGINE:-1}" != "0" ]; then
  ENGINE_PROVIDERS="research-loop,lean-exact,lean-lagged,naive-finetune,lean-exact-bf16-ckpt"
  [ -z "$QUICK" ] && ENGINE_PROVIDERS="$ENGINE_PROVIDERS,lean-exact-2bwd,lean-lagged-1bwd"
  # side by side in one process (step times; memory: 'own MB' in the notes) ...
  run_limited $(( $(left) - 60 )) "$OUT/gpu-engine.log" "$PY" benchmarks/bench_engine.py --device cuda --sd-v1 $QUICK \
    --providers "$ENGINE_PROVIDERS" --out "$OUT/gpu-engine-$stamp.json"
  # ... and bf16 + gradient checkpointing alone, so that max_memory_allocated is its own (the 24 GB check)
  run_limited $(( $(left) - 5 )) "$OUT/gpu-engine-bf16.log" "$PY" benchmarks/bench_engine.py --device cuda --sd-v1 \
    --quick --providers lean-exact-bf16-ckpt --out "$OUT/gpu-engine-bf16-alone-$stamp.json"
fi

step "done: status $status"
ls -l "$OUT" | grep -E "gpu-" || true
exit "$status"
