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
from sdrt.errors import InputError, SdrtError
from sdrt.manifest import TOKENIZER_DIR, ComponentEntry, Manifest, TargetGraph

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "tensorrt")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16", "int8")


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


def _quiet_third_party(progress: bool) -> None:
    """torch's ONNX exporter and transformers log per-op chatter at WARNING; keep the console to ours.
    Without progress (-q), diffusers' and transformers' loading bars go too."""
    import diffusers
    import torch  # noqa: F401  (its loggers exist only once imported)
    import transformers

    transformers.logging.set_verbosity_error()
    for lib in (diffusers, transformers):
        (lib.utils.logging.enable_progress_bar if progress else lib.utils.logging.disable_progress_bar)()
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch", "onnx_ir", "onnxscript")):
            logging.getLogger(name).setLevel(logging.ERROR)


def _target_graphs(name, spec, pipe, staging: Path, model_file: str, precision: str, latent_side: int) -> dict:
    from sdrt import kernels
    from sdrt.export import onnx_export

    out = {}
    for target in kernels.TARGETS:
        path, fused = kernels.optimize(staging / model_file, target, latent_side)
        same = kernels.same_graph_as(target, fused)
        if same in out:  # e.g. onnxruntime-cpu on a component without convolutions
            path.unlink()
            log.info("%s for %s: the %s graph", name, target, same)
            continue
        err, _ = onnx_export.check_parity(name, spec, pipe, path, precision)
        log.info("%s for %s: %s", name, target, ", ".join(f"{k} x{v}" for k, v in fused.items()))
        out[target] = TargetGraph(str(path.relative_to(staging)), fused, err)
    return out


def _latent_side(cpu_size: int | None, vae_scale_factor: int) -> int:
    from sdrt.kernels.winograd import REFERENCE_SIDE

    if cpu_size is None:
        return REFERENCE_SIDE
    if cpu_size % vae_scale_factor:
        raise InputError(f"--cpu-size {cpu_size}: need a positive multiple of the VAE scale factor "
                         f"({vae_scale_factor})")
    return cpu_size // vae_scale_factor


def _check_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        raise SdrtError("--backend tensorrt needs TensorRT and cuda-python on a machine with an NVIDIA GPU "
                        "(pip install sdrt[tensorrt])") from None


def _tensorrt_engines(manifest: Manifest, staging: Path, profile, progress: bool) -> None:
    """Build each component's engine from its TensorRT graph; the ONNX files stay beside it."""
    from tqdm.auto import tqdm

    from sdrt.export import tensorrt

    profile = profile or tensorrt.Profile()
    for name, c in tqdm(manifest.components.items(), desc="tensorrt", unit="engine", disable=not progress):
        onnx_file = staging / c.file_for("tensorrt")
        plan = onnx_file.parent / "model.plan"
        weights = [staging / f for f in c.files if f.endswith(".data")]
        t0 = time.perf_counter()
        hit = tensorrt.build_engine(onnx_file, weights, plan, c.spec, profile, manifest.dims.vae_scale_factor)
        log.info("%s: TensorRT engine %s in %.1f s", name, "from cache" if hit else "built", time.perf_counter() - t0)
        c.backend = "tensorrt"
        c.files = [str(plan.relative_to(staging))] + c.files
        c.optimizations.append(f"TensorRT engine: batch {profile.batch}, {profile.pixels} px (min, opt, max)")


def _to_fp16(name, spec, pipe, staging: Path, files: list[str], err, tol):
    """Convert a staged fp32 component to fp16; the VAE decoder stays fp32 if fp16 overflows on
    probe inputs. Returns (files, precision, parity error,
    tolerance, notes)."""
    from sdrt.export import fp16, onnx_export

    src = staging / files[0]
    dst = src.with_name("model.fp16.onnx")
    fp16.convert(src, dst)
    notes = [f"fp16 (kept in fp32: {', '.join(fp16.FP32_OPS)})"]
    if name == "vae_decoder":
        probe = spec.sample_inputs(onnx_export.parity_sizes(spec), seed=2)
        if fp16.overflows(dst, probe, [t.name for t in spec.outputs]):
            for p in dst.parent.glob(dst.name + "*"):
                p.unlink()
            why = "the fp16 decoder overflowed (NaN/inf) on probe inputs"
            log.warning("vae_decoder kept in fp32: %s", why)
            return files, "fp32", err, tol, [f"fp32: {why}"]
    for f in files:
        (staging / f).unlink()
    files = onnx_export.component_files(staging, name)  # model.fp16.onnx, model.fp16.onnx.data
    err, tol = onnx_export.check_parity(name, spec, pipe, dst, "fp16")
    return files, "fp16", err, tol, notes


def _int8_unet(manifest: Manifest, spec, pipe, staging: Path, optimize: bool) -> ComponentEntry:
    """Replace the staged fp32 UNet by its int8 QDQ graph, calibrated on the staged fp32 engines."""
    from sdrt import kernels
    from sdrt.export import onnx_export, quantize

    size = max(manifest.default_image_size // 2, spec.dims["h"][0] * manifest.dims.vae_scale_factor)
    t0 = time.perf_counter()
    feeds = quantize.calibration_feeds(staging, size)
    fp32 = manifest.components["unet"]
    src = staging / fp32.files[0]
    dst = src.with_name("model.int8.onnx")
    layers = quantize.quantize_unet(src, dst, feeds)
    for f in fp32.files + [t.file for t in fp32.targets.values()]:
        (staging / f).unlink()
    files = onnx_export.component_files(staging, "unet")  # model.int8.onnx, model.int8.onnx.data
    err, tol = onnx_export.check_parity("unet", spec, pipe, dst, "int8")
    targets = {}
    if optimize:
        path, fused = kernels.optimize(dst, "onnxruntime")
        targets["onnxruntime"] = TargetGraph(str(path.relative_to(staging)), fused,
                                             onnx_export.check_parity("unet", spec, pipe, path, "int8")[0])
    note = (f"int8 static QDQ: {layers} Conv/MatMul/Gemm layers, calibrated on {len(feeds)} UNet inputs "
            f"from {len(quantize.CALIBRATION_PROMPTS)} {size} px trajectories")
    log.info("%s in %.1f s", note, time.perf_counter() - t0)
    return ComponentEntry(spec, files, fp32.backend, "int8", [note], err, tol, targets)


def export(source: str, out_dir: str | Path, *, backend: str = "onnx", precision: str = "fp32",
           opset: int | None = None, force: bool = False, progress: bool = True,
           optimize: bool = True, trt_profile=None, cpu_size: int | None = None,
           config: str | Path | None = None, prediction_type: str | None = None,
           loras: list | None = None) -> Manifest:
    """Export SOURCE (diffusers folder, .safetensors / .ckpt file, hub id, `tiny`, `random-sd15`) to
    OUT_DIR; return its manifest.

    config: a diffusers folder whose configs describe a single-file SOURCE (default: detected, SD 1.x
    or 2.x). prediction_type: "epsilon" or "v_prediction", overriding the source's scheduler config.
    loras: LoRA files fused into the UNet and text encoder first ("FILE[:SCALE]" strings or
    sdrt.export.lora.Lora).

    optimize: also write each target's rewritten graph (sdrt.kernels.TARGETS), parity-checked like
    the standard one. cpu_size: the image side the CPU graph's Winograd layers are chosen for
    (default: latent side 64, 512 px for SD). backend "tensorrt": also build a TensorRT engine per
    component from its TensorRT graph (needs a GPU; trt_profile: sdrt.export.tensorrt.Profile)."""
    from tqdm.auto import tqdm

    from sdrt.export import lora, onnx_export, sources

    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        _check_tensorrt()
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: this build exports {', '.join(PRECISIONS)}")
    lora_list = [x if isinstance(x, lora.Lora) else lora.Lora.parse(str(x)) for x in loras or ()]
    for x in lora_list:  # before the (long) load
        if not x.path.is_file():
            raise InputError(f"--lora {x.path}: no such file")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--prediction-type {prediction_type}: choose one of {', '.join(PREDICTION_TYPES)}")
    if cpu_size is not None and cpu_size <= 0:  # before loading the model; the VAE factor check needs it
        raise InputError(f"--cpu-size {cpu_size}: need a positive image side in pixels")
    out_dir = Path(out_dir)
    _check_target(out_dir, force)
    _quiet_third_party(progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with sources.scratch_dir() as scratch:
            t0 = time.perf_counter()
            loaded = sources.load_source(source, Path(scratch), Path(config) if config else None)
            pipe = loaded.pipe
            if prediction_type:
                pipe.scheduler.register_to_config(prediction_type=prediction_type)
            lora_records = lora.apply(pipe, lora_list)
            log.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
            dims = model_dims(pipe)
            specs = component_specs(dims)
            latent_side = _latent_side(cpu_size, dims.vae_scale_factor)
            entries = {}
            for name in tqdm(COMPONENTS, desc="export", unit="component", disable=not progress):
                files = onnx_export.export_component(name, specs[name], pipe, staging,
                                                     opset or onnx_export.DEFAULT_OPSET)
                err, tol = onnx_export.check_parity(name, specs[name], pipe, staging / files[0])
                prec, notes = "fp32", []
                if optimize:  # weights into model.onnx.data, which the target graphs then share
                    from sdrt.kernels.graph import externalize

                    externalize(staging / files[0])
                    files = onnx_export.component_files(staging, name)
                if precision == "fp16":
                    files, prec, err, tol, notes = _to_fp16(name, specs[name], pipe, staging, files, err, tol)
                targets = {}
                if optimize:
                    targets = _target_graphs(name, specs[name], pipe, staging, files[0], prec, latent_side)
                    if any(t.fused.get("WinogradConv") for t in targets.values()):
                        notes.append(f"Winograd layers chosen for {latent_side * dims.vae_scale_factor} px "
                                     "(onnxruntime-cpu graph; sdrt export --cpu-size)")
                entries[name] = ComponentEntry(specs[name], files, backend, prec, notes, err, tol, targets)
            pipe.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
            manifest = Manifest(
                source={"kind": loaded.kind, "name": loaded.name, "sha256": sources.content_hash(pipe)}
                | ({"config": str(Path(config).resolve())} if config else {})
                | ({"loras": lora_records} if lora_records else {}),
                pipeline="inpaint" if dims.unet_in_channels == 9 else "txt2img",
                prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
                vae_scaling_factor=float(pipe.vae.config.scaling_factor), dims=dims,
                scheduler_config=loaded.scheduler_config, components=entries,
                default_image_size=int(pipe.unet.config.sample_size) * dims.vae_scale_factor,
                exporter=_versions() | {"opset": opset or onnx_export.DEFAULT_OPSET})
            manifest.write(staging)
            if precision == "int8":
                entries["unet"] = _int8_unet(manifest, specs["unet"], pipe, staging, optimize)
                manifest.write(staging)
            if backend == "tensorrt":
                _tensorrt_engines(manifest, staging, trt_profile, progress)
                manifest.write(staging)
        umask = os.umask(0)
        os.umask(umask)
        for f in staging.rglob("*"):  # onnx and onnxruntime write some files 0600; engines are shared
            if f.is_file():
                f.chmod(0o666 & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return manifest
