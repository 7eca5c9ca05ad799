"""LoRAs per request: what switching a LoRA set costs next to a generation, and the memory it takes.

    python benchmarks/lora_switch.py --engines ENGINES [--steps 20] [--size 512] [--rank 32]
                                     [--reexport SOURCE] [--out DIR]

Makes two random LoRAs with NumPy (kohya's format, rank R, alpha R/2, on every layer kohya's trainer
adapts in SD 1.x: the UNet's transformer blocks' attention, feed-forward and proj_in/out layers, the
text encoder's attention and MLP layers), then in one process on the engine dir:
1. a base generation: one image, STEPS steps, SIZE px, guidance 7.5 (the UNet runs batch 2);
2. switches base -> A -> B -> A -> base, each timed (`Pipeline.use_loras`: the merged weights, then new
   UNet and text-encoder sessions over them), with the process's RSS before, after and at its peak
   during the switch (sampled every 10 ms), beside the size of the weights the set changes;
3. after each switch a small generation (--small-size px, 2 steps): the A images must be bit-identical, and
   the base ones too.
With --reexport SOURCE it also times `sdrt export SOURCE --lora A` (what a LoRA cost before). Writes
results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRss:
    """The process's largest RSS while inside, sampled every 10 ms."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def kohya_layers(engines: Path) -> dict[str, tuple[str, tuple]]:
    """kohya key stem -> (component, PyTorch weight shape) for the layers kohya's SD 1.x LoRAs adapt."""
    manifest = json.loads((engines / "manifest.json").read_text())
    out = {}
    for component, prefix, keep in (("unet", "lora_unet_", ("attentions_",)),
                                    ("text_encoder", "lora_te_text_model_", ("self_attn", "mlp"))):
        layers = json.loads((engines / manifest["components"][component]["weight_map"]).read_text())["layers"]
        for name, e in layers.items():
            if any(k in name for k in keep):
                out[prefix + name] = (component, tuple(e["shape"][::-1] if e["transposed"] else e["shape"]))
    return out


def make_lora(path: Path, layers: dict, rank: int, seed: int) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for stem, (_, shape) in layers.items():
        fan_in = int(np.prod(shape[1:]))
        tensors[f"{stem}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)).astype(
            np.float16)
        tensors[f"{stem}.lora_up.weight"] = (rng.standard_normal((shape[0], rank, *[1] * (len(shape) - 2)))
                                             * 0.05).astype(np.float16)
        tensors[f"{stem}.alpha"] = np.array(rank / 2, np.float16)
    save_file(tensors, str(path))
    return path


def switches(pipe, files: dict[str, Path], small: dict) -> list[dict]:
    out = []
    for name in ("A", "B", "A", "base"):
        loras = [(str(files[name]), 0.8)] if name != "base" else None
        before = rss_mb()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            pipe.use_loras(loras)
            seconds = time.perf_counter() - t0
        after = rss_mb()
        changed = sum(a.nbytes for arrays in pipe.loras.arrays.values() for a in arrays.values()) / 2**20
        image = pipe(**small, loras=loras).pixels
        out.append({"to": name, "seconds": seconds, "rss_before_mb": before, "rss_after_mb": after,
                    "peak_rss_mb": peak.peak, "changed_weights_mb": changed, "image": image})
        print(f"-> {name}: {seconds:.1f} s, RSS {before:,.0f} -> {after:,.0f} MB (peak {peak.peak:,.0f}), "
              f"changed weights {changed:,.0f} MB", flush=True)
    return out


def reexport(source: str, lora: Path, work: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdrt.cli", "export", source, str(work / "fused"), "--lora", f"{lora}:0.8",
                    "-q"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--small-size", type=int, default=256, help="px of the bit-identity images")
    parser.add_argument("--reexport", metavar="SOURCE", help="also time `sdrt export SOURCE --lora A`")
    parser.add_argument("--out", type=Path, default=Path("lora-switch"))
    args = parser.parse_args()
    import sdrt

    work = Path(tempfile.mkdtemp(prefix="sdrt-lora-"))
    layers = kohya_layers(args.engines)
    files = {"A": make_lora(work / "A.safetensors", layers, args.rank, 1),
             "B": make_lora(work / "B.safetensors", layers, args.rank, 2)}
    pipe = sdrt.Pipeline.load(args.engines)
    small = dict(prompt="a castle on a hill", steps=2, width=args.small_size, height=args.small_size, seed=3)
    empty = rss_mb()
    with PeakRss() as warm:  # the base sessions' creation: its own transient, for comparison
        pipe.warmup()
    warm_rss = rss_mb()
    base_small = pipe(**small).pixels
    rss_base = rss_mb()
    t0 = time.perf_counter()
    pipe("a castle on a hill", steps=args.steps, width=args.size, height=args.size, seed=1)
    generation = time.perf_counter() - t0
    print(f"base generation: {generation:.1f} s ({args.steps} steps, {args.size} px); RSS {rss_base:,.0f} MB",
          flush=True)
    runs = switches(pipe, files, small)
    same_a = bool(np.array_equal(runs[0]["image"], runs[2]["image"]))
    same_base = bool(np.array_equal(base_small, runs[3]["image"]))
    export_s = reexport(args.reexport, files["A"], work) if args.reexport else None
    for r in runs:
        r.pop("image")
    write(args, {"machine": platform.processor() or platform.machine(), "cpu": cpu_name(),
                 "generation_s": generation, "rss_base_mb": rss_base, "switches": runs, "rank": args.rank,
                 "layers": len(layers), "a_then_a_bit_identical": same_a, "base_then_base_bit_identical": same_base,
                 "reexport_s": export_s, "steps": args.steps, "size": args.size,
                 "warmup": {"rss_before_mb": empty, "peak_rss_mb": warm.peak, "rss_after_mb": warm_rss}})


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def write(args, r: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    g = r["generation_s"]
    lines = [f"# LoRA switches on {args.engines.name} ({r['cpu']}, {r['layers']} layers, rank {r['rank']})", "",
             f"Base generation ({r['steps']} steps, {r['size']} px, guidance 7.5): {g:.1f} s; RSS with the sessions "
             f"loaded {r['rss_base_mb']:,.0f} MB. Creating the base sessions (warm-up) took RSS from "
             f"{r['warmup']['rss_before_mb']:,.0f} to {r['warmup']['rss_after_mb']:,.0f} MB, peaking at "
             f"{r['warmup']['peak_rss_mb']:,.0f} MB.", "",
             "| switch to | seconds | share of the generation | RSS after - base MB | peak - base MB "
             "| changed weights MB |", "|---|---|---|---|---|---|"]
    for s in r["switches"]:
        lines.append(f"| {s['to']} | {s['seconds']:.1f} | {s['seconds'] / g:.1%} | "
                     f"{s['rss_after_mb'] - r['rss_base_mb']:,.0f} | {s['peak_rss_mb'] - r['rss_base_mb']:,.0f} | "
                     f"{s['changed_weights_mb']:,.0f} |")
    lines += ["", f"A -> B -> A bit-identical: {r['a_then_a_bit_identical']}; base -> ... -> base bit-identical: "
                  f"{r['base_then_base_bit_identical']}."]
    if r["reexport_s"] is not None:
        lines.append(f"Re-export with the LoRA fused (`sdrt export --lora`): {r['reexport_s']:.0f} s.")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
