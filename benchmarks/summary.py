"""Generate the README's benchmark table from committed results (never typed by hand).

    python benchmarks/summary.py                  # print the table
    python benchmarks/summary.py --write          # replace the block between the markers in README.md

Reads ``benchmarks/results/*.json`` written by the benchmark scripts (see harness.py) and keeps, per file, the
forward+backward rows of ``siss_loss`` and the rows of ``mixture_noise`` / the engine, with the machine they came from.
GPU result files appear once a GPU run has written them; until then the table says "not measured" for the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT.parent / "README.md"
BEGIN, END = "<!-- benchmark-table:begin -->", "<!-- benchmark-table:end -->"


def _fmt_ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _machine(header: dict) -> str:
    gpu = header.get("gpu")
    where = gpu if gpu else f"{header.get('cpu_model', '?')} CPU, {header.get('torch_threads', '?')} threads"
    return (f"{where}; torch {header.get('torch', '?')}, git {str(header.get('git_revision', '?'))[:7]}, "
            f"{str(header.get('date', '?'))[:10]}")


def kernel_table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("status") == "ok"
            and (r["op"] != "siss_loss" or r["mode"] == "forward+backward")]
    if not rows:
        return ""
    lines = [f"**{data.get('title', path.stem)}** — {_machine(data['header'])} (`{path.name}`)", "",
             "| op | shape | dtype | provider | median ms | vs research eager | vs compiled ref |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} {r['mode']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {_fmt_ratio(r.get('speedup_vs_eager'))} | "
                     f"{_fmt_ratio(r.get('speedup_vs_compiled'))} |")
    targets = data.get("targets") or []
    for t in targets:
        if t.get("ratio") is None:
            lines.append(f"\nTarget: `{t['provider']}` ≥ {t['min_ratio']}× `{t['baseline']}`: not measured "
                         f"({t.get('verdict', 'no timed row')})")
            continue
        lines.append(
            f"\nTarget: `{t['provider']}` ≥ {t['min_ratio']}× `{t['baseline']}` ({t['op']} {t['mode']}, {t['shape']} "
            f"{t['dtype']}, {t.get('threads', '?')} threads): median ratio {t['ratio']:.2f}×, ratio of minimums "
            f"{t['ratio_of_minimums']:.2f}× — **{t['verdict']}**")
    return "\n".join(lines)


def engine_table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    lines = [f"**{data.get('title', path.stem)}** — {_machine(data['header'])} (`{path.name}`)", "",
             "| provider | batch shape | mode | median ms / step | notes |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['shape']} | {r['mode']} | {r['median_ms']:.0f} | {r.get('note', '')} |")
    for t in data.get("targets") or []:
        if t["min_ratio"] < 1:  # a cost bound: the provider's step time over the baseline's
            measured = (f"{t['provider']} takes {1 / t['ratio']:.2f}× the time of {t['baseline']} "
                        f"(minimums {1 / t['ratio_of_minimums']:.2f}×)")
        else:
            measured = f"median ratio {t['ratio']:.2f}× (minimums {t['ratio_of_minimums']:.2f}×)"
        lines.append(f"\nTarget: {t.get('statement', t['provider'])} ({t['mode']}): {measured} — **{t['verdict']}**")
    return "\n".join(lines)


def sd_v1_table(path: Path) -> str:
    """``sd_v1_unlearn.py``'s result file, rendered by that script."""
    sys.path.insert(0, str(ROOT))
    import sd_v1_unlearn

    return sd_v1_unlearn.render_markdown(json.loads(path.read_text()))


def build(files) -> str:
    blocks = [sd_v1_table(p) if p.stem.startswith("cpu-sd-v1") else engine_table(p) if "engine" in p.stem
              else kernel_table(p) for p in files]
    blocks = [b for b in blocks if b]
    if not any("gpu" in p.name for p in files):
        blocks.append("GPU (H200 or other): not measured — no GPU run has been made yet; "
                      "`bash benchmarks/gpu_suite.sh` fills these rows.")
    return "\n\n".join(blocks)


def default_files():
    """The result files the README's block is built from (the CI smoke's ``-tiny`` files are not among them)."""
    return sorted(p for p in RESULTS.glob("*.json")
                  if p.stem.startswith(("cpu-2t-target", "cpu-engine", "cpu-sd-v1", "gpu-")) and not p.stem.endswith("-tiny"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md between the markers")
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files (default: the README set)")
    args = parser.parse_args(argv)
    files = args.files or default_files()
    table = build(files)
    if not args.write:
        print(table)
        return 0
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
