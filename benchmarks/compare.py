"""Two `sdrt bench` runs side by side: every ratio against eager PyTorch in both, and how far apart.

    python benchmarks/compare.py RUN_A/results.json RUN_B/results.json [--out spread.md]

Use it to state a benchmark's run-to-run spread (re-run the same command, compare), or to compare two
machines. Prints a Markdown table; the last line is the largest relative difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(results: dict) -> dict[tuple[str, str], float]:
    """(workload, path) -> median ratio against eager, components and generations."""
    entries = {**results.get("components", {}), **results.get("end_to_end", {})}
    return {(w, p): r["median"] for w, e in entries.items() for p, r in e.get("ratios", {}).items()}


def compare(a: dict, b: dict) -> tuple[list[str], float]:
    ra, rb = ratios(a), ratios(b)
    lines = ["| workload | path | run A vs eager | run B vs eager | difference |", "|---|---|---|---|---|"]
    worst = 0.0
    for key in [k for k in ra if k in rb]:
        diff = (rb[key] - ra[key]) / ra[key]
        worst = max(worst, abs(diff))
        lines.append(f"| {key[0]} | {key[1]} | {ra[key]:.2f}x | {rb[key]:.2f}x | {diff:+.0%} |")
    only = sorted(set(ra) ^ set(rb))
    if only:
        lines += ["", "In one run only: " + ", ".join(f"{w} {p}" for w, p in only)]
    cold = [p for p in a.get("cold_start", {}) if p in b.get("cold_start", {})]
    if cold:
        lines += ["", "| cold start | run A first image s | run B first image s | run A peak RSS MB "
                  "| run B peak RSS MB |", "|---|---|---|---|---|"]
        for p in cold:
            ca, cb = a["cold_start"][p], b["cold_start"][p]
            lines.append(f"| {p} | {ca['first_image_s']:.1f} | {cb['first_image_s']:.1f} | "
                         f"{ca['peak_rss_mb']:,.0f} | {cb['peak_rss_mb']:,.0f} |")
    lines += ["", f"Largest relative difference of a ratio: {worst:.0%} ({len(ra.keys() & rb.keys())} ratios)."]
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    a, b = (json.loads(p.read_text()) for p in (args.run_a, args.run_b))
    lines, _ = compare(a, b)
    text = f"Run A: {args.run_a}\n\nRun B: {args.run_b}\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
