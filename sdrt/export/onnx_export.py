"""PyTorch modules -> ONNX files, with dynamic axes derived from `sdrt.components` and a parity check."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from sdrt.components import ComponentSpec, Dim
from sdrt.errors import SdrtError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 23  # emits ONNX Attention / GroupNormalization: a smaller graph, less session memory
# max abs error / max(1, max |reference|). fp16's bound leaves room for fp16 rounding, which is
# larger on a GPU's kernels than on the CPU's casts (random-sd15 UNet: 0.020 on an H100's CUDA
# provider, 0.013 on the CPU provider; it was 2e-2, which that GPU export passed by 5%); a wrong graph
# errs by O(1). int8's bound only catches a broken graph; its accuracy is measured by the benchmark
# (docs/kernels.md, "int8").
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.5}


def wrap(name: str, pipe):
    """The torch module whose forward matches `component_specs()[name]` (inputs -> outputs)."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, te):
            super().__init__()
            self.te = te
            # transformers 5's CLIPTextModel is flat; 4.x nests it under .text_model
            self.norm = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm

        def forward(self, input_ids):  # (B, 77) -> (layers, B, 77, D)
            hidden = self.te(input_ids, output_hidden_states=True).hidden_states[1:]
            return torch.stack([self.norm(h) for h in hidden])

    class Unet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            # diffusers passes explicit upsample sizes only when a latent side is not a multiple of
            # 2 ** num_upsamplers, a branch torch.export would fix at the traced size. Pretending to
            # have 64 upsamplers takes that branch for every size: nearest upsampling to an explicit
            # size equals scale_factor=2 where both apply, and odd latent sides (520 px) then work.
            unet.num_upsamplers = 64

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.scale = float(vae.config.scaling_factor)

        def forward(self, latent):  # sampler latents -> image in [-1, 1]
            return self.vae.decode(latent / self.scale, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.scale = float(vae.config.scaling_factor)

        def forward(self, image):  # image in [-1, 1] -> posterior mean and std, in sampler units
            dist = self.vae.encode(image).latent_dist
            return dist.mean * self.scale, dist.std * self.scale

    class DepthEstimator(torch.nn.Module):
        def __init__(self, dpt):
            super().__init__()
            self.dpt = dpt

        def forward(self, pixel_values):  # the image processor's output -> (B, h, w) depth
            return self.dpt(pixel_values=pixel_values).predicted_depth

    module = {"text_encoder": lambda: TextEncoder(pipe.text_encoder), "unet": lambda: Unet(pipe.unet),
              "vae_decoder": lambda: VaeDecoder(pipe.vae), "vae_encoder": lambda: VaeEncoder(pipe.vae),
              "depth_estimator": lambda: DepthEstimator(pipe.depth_estimator)}[name]()
    return module.eval()


def _axes(spec: ComponentSpec, value) -> dict:
    """torch.export's dynamic_shapes layout: each input's dynamic axes, VALUE(dim) for each (None for
    an input without one)."""
    return {t.name: {i: value(d) for i, d in enumerate(t.shape) if isinstance(d, Dim)} or None
            for t in spec.inputs}


def _dynamic_shapes(spec: ComponentSpec) -> dict:
    """The spec's dimensions as torch.export Dims with their declared ranges."""
    from torch.export import Dim as TorchDim

    dims = {name: TorchDim(name, min=r[0], max=r[2]) for name, r in spec.dims.items()}
    return _axes(spec, lambda d: dims[d.name] if d.scale == 1 else d.scale * dims[d.name])


def _axis_names(spec: ComponentSpec) -> dict:
    """Each input's dynamic axes by name ("B", "77*c"), as the graph's inputs and outputs call them."""
    return _axes(spec, lambda d: d.name if d.scale == 1 else f"{d.scale}*{d.name}")


def parity_sizes(spec: ComponentSpec) -> dict[str, int]:
    """Small, non-square, batch-2 sizes for the export-time check (cheap even for SD 1.5)."""
    sizes = spec.sizes("min")
    if "B" in sizes:
        sizes["B"] = max(2, sizes["B"])
    if "w" in sizes:
        sizes["w"] = min(2 * sizes["w"], spec.dims["w"][2])
    if "c" in sizes:  # two prompt chunks: a rewrite that assumed 77 tokens fails here
        sizes["c"] = min(2, spec.dims["c"][2])
    return sizes


# SDRT_EXPORT_CACHE=DIR: keep each exported standard graph there, keyed by everything it depends on
# (the module's weights and config, the component spec, opset, torch and sdrt versions), and reuse it
# when a later export has the same key: re-exporting a model at another precision, with other
# targets or into another directory skips torch's exporter (about 25 s a component for `tiny` on
# 2 cores, minutes for SD 1.5). Off by default: it holds a full copy of every model exported.
CACHE_ENV = "SDRT_EXPORT_CACHE"
_MODULES = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae",
            "depth_estimator": "depth_estimator"}


def cache_key(name: str, spec: ComponentSpec, pipe, opset: int) -> str:
    import json

    import torch

    import sdrt
    from sdrt.export.sources import hash_weights

    module = getattr(pipe, _MODULES[name])
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)  # transformers'
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # _name_or_path: where it was loaded from
    h = hashlib.sha256(json.dumps([name, spec.to_json(), opset, torch.__version__, sdrt.__version__, config],
                                  sort_keys=True, default=str).encode())
    hash_weights(h, module)
    return h.hexdigest()[:32]


def export_component(name: str, spec: ComponentSpec, pipe, out_dir: Path, opset: int = DEFAULT_OPSET) -> list[str]:
    """Export one component to `out_dir/name/model.onnx` (+ external data over 2 GB). Returns its files.
    With SDRT_EXPORT_CACHE set, an identical earlier export is copied instead."""
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return _export(name, spec, pipe, out_dir, opset)
    entry = Path(cache) / cache_key(name, spec, pipe, opset)
    Path(cache).mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent export of the same key waits, then copies
        if not (entry / "complete").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache))
            _export(name, spec, pipe, tmp, opset)
            (tmp / name / "complete").touch()
            os.rename(tmp / name, entry)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("%s: the standard graph from the export cache %s", name, entry)
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    for f in entry.iterdir():
        if f.name != "complete":
            shutil.copyfile(f, out_dir / name / f.name)
    return component_files(out_dir, name)


def _export(name: str, spec: ComponentSpec, pipe, out_dir: Path, opset: int) -> list[str]:
    import torch

    module = wrap(name, pipe)
    args = example_inputs(spec)
    target = out_dir / name / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = _capture(name, module, args, spec)
        program = torch.onnx.export(
            captured, args, dynamo=True, opset_version=opset,
            # a captured program has its dynamic dimensions; the names then only rename its axes
            dynamic_shapes=_dynamic_shapes(spec) if captured is module else _axis_names(spec),
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            report=False, verbose=False)
    program.save(target)  # torch writes external data itself when the model is over 2 GB
    del program
    return component_files(out_dir, name)


def example_inputs(spec: ComponentSpec) -> tuple:
    """The torch tensors the capture traces: the spec's opt sizes, with each dynamic dimension at 2 at
    least (torch.export fixes a dimension whose example is 1: prompt chunks, a batch of 1)."""
    import torch

    sizes = {k: max(v, 2) if spec.dims[k][2] > 1 else v for k, v in spec.sizes("opt").items()}
    feeds = spec.sample_inputs(sizes)
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)


def _capture(name: str, module, args: tuple, spec: ComponentSpec):
    """The module as torch.export's non-strict ExportedProgram, for torch.onnx.export to translate;
    the module itself where that capture fails (torch.onnx.export then tries its own strategies).

    torch.onnx.export's own non-strict capture (torch 2.13) defers shape guards to runtime asserts,
    and building one of the UNet's fails ("symbolically traced variables cannot be used as inputs to
    control flow": a true division of two sizes). It then falls back to a strict (dynamo) capture,
    which takes twice as long (tiny's UNet: 60 s against 32 s on 2 cores). Here the guards stay
    guards, with the size-oblivious reasoning torch.onnx also uses (a size is not taken to be 1), on
    dimensions declared dynamic without a range: SD 1.5's UNet guards its deepest level as wider
    than 1, which a declared latent side of 8 would contradict. The ONNX graph has no ranges, and the
    export's parity check runs it at the spec's smallest sizes."""
    import torch

    dynamic = _axes(spec, lambda d: torch.export.Dim.DYNAMIC)
    try:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch raises many kinds here; its own strategies may still succeed
        log.info("%s: torch.export's non-strict capture failed (%s); torch.onnx.export captures it",
                 name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return module


def component_files(out_dir: Path, name: str) -> list[str]:
    """The component's files relative to OUT_DIR, model.onnx first."""
    return sorted(str(p.relative_to(out_dir)) for p in (out_dir / name).iterdir() if p.is_file())


def check_parity(name: str, spec: ComponentSpec, pipe, onnx_path: Path,
                 precision: str = "fp32", optimize: bool = True) -> tuple[float, float]:
    """Run the ONNX file and the torch module on the same inputs; return (max abs error, tolerance).
    fp16 graphs run on ONNX Runtime's CUDA provider, or its CPU provider (sdrt.export.fp16.run_fp16);
    the others on its CPU provider (OPTIMIZE=False: with its graph optimizations off).

    Raises SdrtError when the error is over tolerance: a wrong engine must not look valid.
    """
    import torch

    from sdrt.export import fp16
    from sdrt.runtime.backends.onnxruntime import session

    feeds = spec.sample_inputs(parity_sizes(spec), seed=1)
    names = [t.name for t in spec.outputs]
    from sdrt.kernels.cuda import has_cuda_only_ops

    if precision == "fp16" or has_cuda_only_ops(onnx_path):
        got = fp16.run_fp16(onnx_path, feeds, names)
    else:
        got = session(onnx_path, optimize=optimize).run(names, feeds)
    module = wrap(name, pipe)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    err = 0.0
    scale = 1.0
    for r, g in zip(refs, got):
        if r.shape != g.shape:
            raise SdrtError(f"export of {name}: ONNX output shape {g.shape} != PyTorch {r.shape}")
        err = max(err, float(np.max(np.abs(r.astype(np.float64) - g))))
        scale = max(scale, float(np.max(np.abs(r))))
    tol = PARITY_TOLERANCE[precision] * scale
    if not np.isfinite(err) or err > tol:
        raise SdrtError(f"export of {name}: ONNX differs from PyTorch by {err:.3g} (tolerance {tol:.3g})")
    log.info("%s parity: max abs error %.3g (tolerance %.3g)", name, err, tol)
    return err, tol
