#!/usr/bin/env bash
# Smoke pass of every benchmark on tiny sizes (seconds): they must run end to end and write their results.
#   bash benchmarks/smoke.sh VENV_DIR        (.ci/run calls: bash benchmarks/smoke.sh .venv)
# Exits non-zero when a script fails, a provider errors (an "error" row), or a results file is missing or malformed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:?usage: bash benchmarks/smoke.sh VENV_DIR}"
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "smoke.sh: no python at $PY" >&2; exit 2; }

# An installed siss_fast (the CI venv's wheel) is used as installed; a bare checkout is imported in place.
if ! (cd / && "$PY" -c "import siss_fast" 2>/dev/null); then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/siss-bench-smoke.XXXXXX")"
trap 'rm -rf "$OUTDIR"' EXIT
DEVICE="${SMOKE_DEVICE:-cpu}"
start=$(date +%s)

for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  threads=2
  # engine: one thread (a UNet step on 2 threads of a loaded 2-core machine stalls for seconds)
  [ "$name" = bench_engine ] && threads=1
  echo "--- $name --tiny --device $DEVICE --threads $threads"
  "$PY" "$bench" --tiny --device "$DEVICE" --threads "$threads" --out "$OUTDIR/$name.json" > "$OUTDIR/$name.log" 2>&1 || {
    cat "$OUTDIR/$name.log"; echo "smoke.sh: $name failed" >&2; exit 1; }
  tail -n 3 "$OUTDIR/$name.log"
  "$PY" - "$OUTDIR/$name.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
rows = doc["rows"]
assert rows, "no rows"
assert doc["header"].get("torch") and doc["header"].get("git_revision"), "header incomplete"
bad = [r for r in rows if r["status"] == "error"]
assert not bad, f"error rows: {bad}"
timed = [r for r in rows if r["status"] == "ok"]
assert timed and all(r["median_ms"] > 0 for r in timed), "no timed rows"
print(f"    {len(rows)} rows, {len(timed)} timed, JSON ok")
PYEOF
  [ -s "$OUTDIR/$name.md" ] || { echo "smoke.sh: $name wrote no markdown table" >&2; exit 1; }
done

echo "--- bench_engine: every CPU provider timed, the four targets evaluated, split counts reported"
"$PY" - "$OUTDIR/bench_engine.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
timed = {r["provider"] for r in doc["rows"] if r["status"] == "ok"}
need = {"research-loop", "lean-exact", "lean-lagged", "naive-finetune"}
assert need <= timed, f"engine providers not timed: {sorted(need - timed)}"
assert len(doc["targets"]) >= 4 and all(t["verdict"] in ("target met", "MISSED") for t in doc["targets"][:4]), \
    doc["targets"]
exact = next(r for r in doc["rows"] if r["provider"] == "lean-exact")
assert "mixed" in exact["note"] and exact["extra_mem_mb"] is not None, exact
print(f"    engine JSON ok ({len(timed)} providers timed)")
PYEOF

echo "--- sd_v1_unlearn.py --tiny: siss-fast unlearn and the research loop per case, each in its own process"
"$PY" benchmarks/sd_v1_unlearn.py --tiny --steps 2 --threads 1 --cases naive-finetune,lean-exact,lora-r8,lora-r8-bf16,research-loop \
  --work "$OUTDIR/sd-v1-tiny" --out "$OUTDIR/sd_v1_unlearn.json" > "$OUTDIR/sd_v1_unlearn.log" 2>&1 || {
  cat "$OUTDIR/sd_v1_unlearn.log"; echo "smoke.sh: sd_v1_unlearn.py failed" >&2; exit 1; }
"$PY" - "$OUTDIR/sd_v1_unlearn.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
bad = [(r["case"], r["status"]) for r in doc["rows"] if r["status"] != "ok"]
assert not bad, bad
assert all(r["median_step_s"] > 0 and r["peak_step_gb"] > 0 for r in doc["rows"]), doc["rows"]
assert len(doc["targets"]) == 5, doc["targets"]  # sd_v1_unlearn.TARGETS
print(f"    sd_v1_unlearn JSON ok ({len(doc['rows'])} cases)")
PYEOF

echo "--- gpu_oracle_check.py --tiny on the CPU (the script gpu_suite.sh runs; cpp backend here)"
"$PY" benchmarks/gpu_oracle_check.py --device cpu --backends cpp,torch --tiny --out "$OUTDIR/oracle.json" \
  || { echo "smoke.sh: gpu_oracle_check.py failed" >&2; exit 1; }

if "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
  echo "--- pytest benchmarks/ --benchmark-only (tiny)"
  # the venv's pytest entry point, not `python -m pytest`, which would put the checkout ahead of an installed wheel
  PYTEST=("$PY" -m pytest); [ -x "$VENV/bin/pytest" ] && PYTEST=("$VENV/bin/pytest")
  SISS_FAST_BENCH_TINY=1 "${PYTEST[@]}" benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 3
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "smoke.sh: pytest-benchmark run failed (rc=$rc)" >&2; exit 1; }
else
  echo "--- pytest-benchmark not installed in $VENV: skipping the pytest integration (pip install pytest-benchmark)"
fi
echo "benchmark smoke pass ok ($(( $(date +%s) - start )) s)"
