"""How fast a whole image could be if the UNet's attention cost nothing: an upper bound on the speed-up
over eager PyTorch that exact computation of everything else allows on this CPU.

The UNet graph a generation runs (the provider's guided graph, through the pipeline's own backend)
is timed beside two variants written next to it, with the attention cut out:

- `no-64x64-attention`: every self-attention at the 64x64 level (SD 1.5 at 512 px: the first down
  block's and the last up block's, five in all) returns its value input instead (the output's shape);
- `no-attention`: every Attention node returns its query (self- and cross-attention, every level).

The score GEMMs, softmax and weighted sum go; the projections around them stay (the key projections
of the cut self-attentions aside: they go with them, 1.7 of 677 GMAC). The variants compute wrong
values: they are timed, never used. Beside them, eager diffusers fp32 runs the same UNet call, and
the VAE decoder runs on both, so the bound is taken round by round on one machine:

    image bound = (steps x eager UNet step + eager decode) / (steps x variant step + sdrt decode)

If the bound for `no-attention` is under a speed-up target, no work on the attention reaches it: the
rest of the step would have to get faster too. Writes JSON.

    python benchmarks/attention_bound.py --engines engines/sd15-int8 --size 512 --rounds 3 \\
        --out benchmarks/results/cpu-vs-optimum-xeon-5/attention_bound.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrt.kernels.graph import load_graph_only, module_scopes, save_graph_only  # noqa: E402
from sdrt.manifest import Manifest  # noqa: E402
from sdrt.runtime.backends import load_backend  # noqa: E402
from sdrt.runtime.backends.guided import GuidedBackend  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

TOP_LEVEL = ("down_blocks.0.", "up_blocks.3.")  # SD 1.5's attention blocks at the latents' full resolution


def cut_attention(src: Path, dst: Path, top_level_self_only: bool) -> int:
    """Write SRC's graph with Attention nodes replaced by a pass-through of their value (self) or query
    input; returns how many were cut."""
    model = load_graph_only(src)
    graph = model.graph
    cut = 0
    for node in list(graph.node):
        if node.op_type != "Attention":
            continue
        where = " ".join(module_scopes(node)) or node.name  # its module paths, else its name
        is_self = "attn1" in where
        if top_level_self_only and not (is_self and any(level in where for level in TOP_LEVEL)):
            continue
        keep = node.input[2] if is_self else node.input[0]  # v (self) or q: both have the output's shape
        identity = helper.make_node("Identity", [keep], [node.output[0]], name=f"{node.name}/cut")
        graph.node.insert(list(graph.node).index(node), identity)
        graph.node.remove(node)
        cut += 1
    save_graph_only(model, dst)
    return cut


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="steps of the image the bound is for")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-eager", action="store_true", help="time sdrt's graphs only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    m = Manifest.read(args.engines)
    pipe = Pipeline.load(args.engines, provider=args.provider)
    unet = pipe.engine("unet")
    if not isinstance(unet, GuidedBackend):
        raise SystemExit(f"{args.engines}: the {pipe.provider} UNet graph has no guided variant; re-export")
    c = m.components["unet"]
    side = args.size // m.dims.vae_scale_factor
    feeds = c.spec.sample_inputs({"B": 2, "h": side, "w": side})
    for k in ("sample", "timestep"):  # a guidance step: both halves share latents and timestep
        feeds[k] = np.concatenate([feeds[k][:1], feeds[k][:1]])
    decoder = m.components["vae_decoder"]
    decode_feeds = decoder.spec.sample_inputs({"B": 1, "h": side, "w": side})

    def load(path, spec):
        return load_backend(path, spec, c.backend, pipe.provider)

    paths = {"sdrt": unet}
    cuts, written = {}, []
    for name, top_only in (("no-64x64-attention", True), ("no-attention", False)):
        dst = unet.guided_path.with_name(unet.guided_path.name.replace(".onnx", f".{name}.onnx"))
        cuts[name] = cut_attention(unet.guided_path, dst, top_only)
        written.append(dst)
        paths[name] = GuidedBackend(unet.path, dst, c.spec, load, pipe.provider)
    eager = None
    if not args.no_eager:
        from sdrt.bench.paths import EagerPath

        eager = EagerPath(m, args.engines)
    try:
        runs = {name: (lambda b=b: b.run(feeds)) for name, b in paths.items()}
        runs["sdrt-decode"] = lambda: pipe.engine("vae_decoder").run(decode_feeds)
        if eager is not None:
            runs["eager"] = lambda: eager.run("unet", feeds)
            runs["eager-decode"] = lambda: eager.run("vae_decoder", decode_feeds)
        for fn in runs.values():  # compile (static shapes) and warm up: not kept
            fn()
        times = {name: [] for name in runs}
        for r in range(args.rounds):  # alternating: every path once a round
            for name, fn in runs.items():
                times[name].append(timed(fn))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        assert all(b.guided_calls for b in paths.values()), "a guided call ran the plain graph"
    finally:
        for b in paths.values():
            b.close()
        pipe.close()
        for f in written:
            f.unlink()

    result = {"engines": str(args.engines), "provider": pipe.provider, "size": args.size, "batch": 2,
              "steps": args.steps, "cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
              "attention_nodes_cut": cuts, "seconds": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()}}
    if eager is not None:
        bounds = {}
        for name in paths:
            per_round = [(args.steps * e + ed) / (args.steps * s + sd) for e, ed, s, sd in
                         zip(times["eager"], times["eager-decode"], times[name], times["sdrt-decode"])]
            step = [e / s for e, s in zip(times["eager"], times[name])]
            bounds[name] = {"image_vs_eager": per_round, "image_vs_eager_median": statistics.median(per_round),
                            "unet_step_vs_eager": step, "unet_step_vs_eager_median": statistics.median(step)}
        result["vs_eager"] = bounds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bounds = {k: round(v["image_vs_eager_median"], 2) for k, v in result.get("vs_eager", {}).items()}
    print(json.dumps({k: result[k] for k in ("median_s", "attention_nodes_cut")} | {"vs_eager": bounds}, indent=1))


if __name__ == "__main__":
    main()
