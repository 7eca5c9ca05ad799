"""Bench results -> results.json, results.md (ratios against eager PyTorch) and results.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _ratio(entry: dict, path: str) -> str:
    r = entry.get("ratios", {}).get(path)
    return f"{r['median']:.2f}x ({r['min']:.2f}–{r['max']:.2f})" if r else "–"


def _seconds(entry: dict, path: str) -> str:
    s = entry["paths"].get(path)
    return f"{s['median']:.3f}" if s else "–"


def markdown(results: dict, command: str | None = None) -> str:
    m, paths = results["machine"], results["paths"]
    others = [p for p in paths if p != "eager"]
    lines = [f"# sdrt bench: {results['source'].get('name')}", "",
             f"{m['cpu']}, {m['cores']} cores, {m.get('memory_gib') or 0:.0f} GiB; onnxruntime "
             f"{m.get('onnxruntime', '?')}, torch {m.get('torch', '–')}, diffusers {m.get('diffusers', '–')}. "
             f"Median seconds over {results['settings']['repeats']} rounds after {results['settings']['warmup']} "
             f"warm-up; ratio = eager time / path time, taken round by round (median, min–max). "
             f"GEMM probe: {results['gemm']['gflops']:.0f} GFLOP/s "
             f"{ {'float16': 'fp16'}.get(results['gemm'].get('dtype'), 'fp32')}"
             + "".join(f"; GPU: {g}" for g in m.get("gpus", [])) + ".", ""]
    if command:
        lines += [f"Reproduce: `{command}`", ""]
    if results.get("providers"):
        lines += ["Providers: " + "; ".join(f"{p}: {how}" for p, how in results["providers"].items()) + ".", ""]
    header = "| workload | " + " | ".join(f"{p} s" for p in paths) + " | " + " | ".join(
        f"{p} vs eager" for p in others) + " | " + " | ".join(f"{p} GFLOP/s (of peak)" for p in paths) + " |"
    lines += [header, "|" + "---|" * (1 + len(paths) + len(others) + len(paths))]
    for name, e in results.get("components", {}).items():
        gf = [f"{e['gflops'][p]:.0f} ({e['fraction_of_peak'][p]:.0%})" if "gflops" in e and p in e["gflops"]
              else "–" for p in paths]
        lines.append(f"| {name} | " + " | ".join(_seconds(e, p) for p in paths) + " | "
                     + " | ".join(_ratio(e, p) for p in others) + " | " + " | ".join(gf) + " |")
    if results.get("end_to_end"):
        lines += ["", "| generation | " + " | ".join(f"{p} s" for p in paths) + " | "
                  + " | ".join(f"{p} vs eager" for p in others) + " | "
                  + " | ".join(f"{p} images/min" for p in paths) + " |",
                  "|" + "---|" * (1 + len(paths) + len(others) + len(paths))]
        for name, e in results["end_to_end"].items():
            ipm = [f"{e['images_per_minute'][p]:.2f}" if p in e["images_per_minute"] else "–" for p in paths]
            lines.append(f"| {name}, {e['steps']} steps {e['sampler']} | "
                         + " | ".join(_seconds(e, p) for p in paths) + " | "
                         + " | ".join(_ratio(e, p) for p in others) + " | " + " | ".join(ipm) + " |")
    lines += _quality_and_peer(results)
    if results.get("cold_start"):
        cold = results["cold_start"]
        gpu = any("peak_gpu_mb" in c for c in cold.values())
        lines += ["", "| cold start (fresh process) | load s | first image s | peak RSS MB |"
                  + (" peak GPU MB |" if gpu else ""), "|---|---|---|---|" + ("---|" if gpu else "")]
        for p, c in cold.items():
            g = (f" {c['peak_gpu_mb']:,.0f} |" if "peak_gpu_mb" in c else " – |") if gpu else ""
            lines.append(f"| {p} | {c['load_s']:.1f} | {c['first_image_s']:.1f} | {c['peak_rss_mb']:,.0f} |" + g)
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def _quality_and_peer(results: dict) -> list[str]:
    """Per generation: each path's PSNR against eager fp32 (and a cached path's against its own full
    compute) and its speed-up over each optimum-intel configuration, round by round."""
    lines = []
    for name, e in results.get("end_to_end", {}).items():
        peers = list(e.get("ratios_vs_peer", {}))
        if not e.get("psnr") and not peers:
            continue
        lines += ["", f"| {name}: path | PSNR vs eager dB | PSNR vs own full compute dB |"
                  + "".join(f" speed-up vs {k} |" for k in peers), "|---|---|---|" + "---|" * len(peers)]
        for p in e["paths"]:
            q = e.get("psnr", {}).get(p, {})
            cells = [f"{q[k]:.1f}" if k in q else "–" for k in ("vs_eager", "vs_full_compute")]
            cells += [_ratio({"ratios": e["ratios_vs_peer"][k]}, p) for k in peers]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def chart(results: dict, path: Path) -> bool:
    """Ratios against eager per workload, one bar group per path. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    entries = {**results.get("components", {}), **results.get("end_to_end", {})}
    others = [p for p in results["paths"] if p != "eager"]
    names = [n for n, e in entries.items() if any(p in e.get("ratios", {}) for p in others)]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) * len(others) + 1.5))
    height = 0.8 / len(others)
    for k, p in enumerate(others):
        vals = [entries[n]["ratios"].get(p, {}).get("median", 0) for n in names]
        ys = [i + k * height for i in range(len(names))]
        ax.barh(ys, vals, height=height, label=p)
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks([i + height * (len(others) - 1) / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over eager PyTorch (eager time / path time, median of rounds)")
    ax.set_title(f"sdrt bench: {results['source'].get('name')} on {results['machine']['cpu']}", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PARTIAL = "results.partial.json"


def write_partial(results: dict, out_dir: Path) -> None:
    """What a run has measured so far (atomically replaced after every workload): a run that dies
    after an hour keeps its finished workloads. `write` removes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (PARTIAL + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_dir / PARTIAL)


def write(results: dict, out_dir: Path, command: str | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "results.json", out_dir / "results.md"]
    files[0].write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / PARTIAL).unlink(missing_ok=True)
    files[1].write_text(markdown(results, command))
    if chart(results, out_dir / "results.png"):
        files.append(out_dir / "results.png")
    return files
