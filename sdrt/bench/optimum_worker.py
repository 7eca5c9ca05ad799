"""optimum-intel's OVStableDiffusionPipeline for `sdrt bench`, run by the interpreter that has
optimum-intel installed (its own environment: it pins transformers and torch versions of its own).
Standalone: it imports nothing from sdrt.

    python optimum_worker.py MODEL_DIR OV_DIR {dynamic|static}

MODEL_DIR: the model as a diffusers folder; OV_DIR: its OpenVINO export, made there once
(`from_pretrained(export=True)`, optimum-intel's defaults) and reused. Then one JSON request per
stdin line, each answered by one stdout line starting with `SDRT `:

    {"op": "generate", "prompt", "steps", "size", "batch", "seed", "scheduler": [class, {overrides}],
     "out": a .npy path for the images}  ->  {"ok": true, "seconds": s}
    {"op": "rss"}  ->  {"peak_rss_mb": peak RSS of this process}

static: the pipeline is reshaped to each request's (batch, size) and compiled for it, as
optimum-intel's documentation recommends for speed (a new shape compiles again).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def load(model_dir: str, ov_dir: str):
    from optimum.intel import OVStableDiffusionPipeline

    out = Path(ov_dir)
    if not (out / "model_index.json").is_file():
        pipe = OVStableDiffusionPipeline.from_pretrained(model_dir, export=True, compile=False)
        pipe.save_pretrained(out)
        del pipe
    return OVStableDiffusionPipeline.from_pretrained(out, compile=False)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    def __init__(self, model_dir: str, ov_dir: str, mode: str):
        self.pipe = load(model_dir, ov_dir)
        self.pipe.set_progress_bar_config(disable=True)
        self.static, self.shape = mode == "static", None
        if not self.static:
            self.pipe.compile()

    def generate(self, r: dict) -> dict:
        import diffusers
        import numpy as np
        import torch

        shape = (r["batch"], r["size"])
        if self.static and shape != self.shape:
            self.pipe.reshape(batch_size=r["batch"], height=r["size"], width=r["size"], num_images_per_prompt=1)
            self.pipe.compile()
            self.shape = shape
        cls, overrides = r["scheduler"]
        self.pipe.scheduler = getattr(diffusers, cls).from_config(self.pipe.scheduler.config, **overrides)
        t0 = time.perf_counter()
        generators = [torch.Generator().manual_seed(r["seed"] + i) for i in range(r["batch"])]  # as sdrt's noise
        images = self.pipe([r["prompt"]] * r["batch"], num_inference_steps=r["steps"], height=r["size"],
                           width=r["size"], generator=generators, output_type="np").images
        seconds = time.perf_counter() - t0
        np.save(r["out"], np.asarray(images, dtype=np.float32))
        return {"ok": True, "seconds": seconds}


def main(model_dir: str, ov_dir: str, mode: str) -> None:
    worker = Worker(model_dir, ov_dir, mode)
    print("SDRT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            r = json.loads(line)
            reply = worker.generate(r) if r["op"] == "generate" else {"peak_rss_mb": peak_rss_mb()}
        except Exception as e:  # noqa: BLE001 - the parent reports it and drops the path
            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print("SDRT " + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
