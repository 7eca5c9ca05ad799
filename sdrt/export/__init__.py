"""`sdrt export`: a checkpoint -> an engine directory (ONNX components, tokenizer, manifest.json).

Needs the `export` extra (torch, diffusers, transformers, onnx). The directory appears atomically:
everything is written to a hidden sibling first and renamed into place only when every component
has passed its parity check, so a failed export never leaves something that looks like engines.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path

from sdrt.components import COMPONENTS, ModelDims, component_specs
from sdrt.errors import InputError
from sdrt.manifest import TOKENIZER_DIR, ComponentEntry, Manifest

log = logging.getLogger(__name__)

BACKENDS = ("onnx",)
PRECISIONS = ("fp32",)


def model_dims(pipe) -> ModelDims:
    te, vae = pipe.text_encoder.config, pipe.vae.config
    return ModelDims(text_length=int(pipe.tokenizer.model_max_length), text_hidden=te.hidden_size,
                     text_layers=te.num_hidden_layers, unet_in_channels=pipe.unet.config.in_channels,
                     latent_channels=vae.latent_channels,
                     vae_scale_factor=2 ** (len(vae.block_out_channels) - 1))


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} is not empty (use --force to replace it)")


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    import sdrt

    return {"sdrt": sdrt.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _quiet_third_party() -> None:
    """torch's ONNX exporter and transformers log per-op chatter at WARNING; keep the console to ours."""
    import torch  # noqa: F401  (its loggers exist only once imported)
    import transformers

    transformers.logging.set_verbosity_error()
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch", "onnx_ir", "onnxscript")):
            logging.getLogger(name).setLevel(logging.ERROR)


def export(source: str, out_dir: str | Path, *, backend: str = "onnx", precision: str = "fp32",
           opset: int | None = None, force: bool = False, progress: bool = True) -> Manifest:
    """Export SOURCE (diffusers folder, hub id, `tiny`, `random-sd15`) to OUT_DIR; return its manifest."""
    from tqdm.auto import tqdm

    from sdrt.export import onnx_export, sources

    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: this build exports {', '.join(BACKENDS)} "
                         "(TensorRT engines are not built yet)")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: this build exports {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    _check_target(out_dir, force)
    _quiet_third_party()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with sources.scratch_dir() as scratch:
            t0 = time.perf_counter()
            loaded = sources.load_source(source, Path(scratch))
            pipe = loaded.pipe
            log.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
            dims = model_dims(pipe)
            specs = component_specs(dims)
            entries = {}
            for name in tqdm(COMPONENTS, desc="export", unit="component", disable=not progress):
                files = onnx_export.export_component(name, specs[name], pipe, staging,
                                                     opset or onnx_export.DEFAULT_OPSET)
                err, tol = onnx_export.check_parity(name, specs[name], pipe, staging / files[0], precision)
                entries[name] = ComponentEntry(specs[name], files, backend, precision, [], err, tol)
            pipe.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
            manifest = Manifest(
                source={"kind": loaded.kind, "name": loaded.name, "sha256": sources.content_hash(pipe)},
                pipeline="inpaint" if dims.unet_in_channels == 9 else "txt2img",
                prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
                vae_scaling_factor=float(pipe.vae.config.scaling_factor), dims=dims,
                scheduler_config=loaded.scheduler_config, components=entries,
                default_image_size=int(pipe.unet.config.sample_size) * dims.vae_scale_factor,
                exporter=_versions() | {"opset": opset or onnx_export.DEFAULT_OPSET})
            manifest.write(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return manifest
