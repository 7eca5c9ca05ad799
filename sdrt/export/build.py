"""`sdrt export` as stages: load the source, then per component ONNX -> (fp16) -> target graphs, then
the engine-wide stages (int8 UNet, TensorRT engines), then the manifest. Each stage returns new
component entries; only `export` assembles the manifest. Everything is written into a staging
folder that sdrt.export.outdir publishes atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import time
from pathlib import Path

from sdrt.components import DEPTH_ESTIMATOR, ComponentSpec, ModelDims, component_specs
from sdrt.errors import InputError, SdrtError
from sdrt.export.outdir import LOCK, OutDir, fault
from sdrt.manifest import TOKENIZER_DIR, ComponentEntry, FeatureCache, Manifest, TargetGraph, file_records
from sdrt.runtime.denoiser import PREDICTION_TYPES

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class Options:
    """What `export` was asked for, checked before the (long) model load."""

    backend: str = "onnx"
    precision: str = "fp32"
    opset: int | None = None
    optimize: bool = True
    trt_profile: object = None  # sdrt.export.tensorrt.Profile
    cpu_size: int | None = None
    config: Path | None = None
    prediction_type: str | None = None
    loras: tuple = ()  # sdrt.export.lora.Lora
    progress: bool = True

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend}: choose one of {', '.join(BACKENDS)}")
        if self.backend == "tensorrt":
            _check_tensorrt()
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision}: this build exports {', '.join(PRECISIONS)}")
        for x in self.loras:
            if not x.path.is_file():
                raise InputError(f"--lora {x.path}: no such file")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"--prediction-type {self.prediction_type}: choose one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.cpu_size is not None and self.cpu_size <= 0:
            raise InputError(f"--cpu-size {self.cpu_size}: need a positive image side in pixels")


def model_dims(pipe) -> ModelDims:
    te, vae = pipe.text_encoder.config, pipe.vae.config
    return ModelDims(text_length=int(pipe.tokenizer.model_max_length), text_hidden=te.hidden_size,
                     text_layers=te.num_hidden_layers, unet_in_channels=pipe.unet.config.in_channels,
                     latent_channels=vae.latent_channels,
                     vae_scale_factor=2 ** (len(vae.block_out_channels) - 1))


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


def _check_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        raise SdrtError("--backend tensorrt needs TensorRT and cuda-python on a machine with an NVIDIA GPU "
                        "(pip install sdrt[tensorrt])") from None


def _latent_side(cpu_size: int | None, vae_scale_factor: int) -> int:
    from sdrt.kernels.winograd import REFERENCE_SIDE

    if cpu_size is None:
        return REFERENCE_SIDE
    if cpu_size % vae_scale_factor:
        raise InputError(f"--cpu-size {cpu_size}: need a positive multiple of the VAE scale factor "
                         f"({vae_scale_factor})")
    return cpu_size // vae_scale_factor


# -- per-component stages ----------------------------------------------------------------------

def onnx_stage(name: str, spec: ComponentSpec, pipe, staging: Path, opts: Options) -> ComponentEntry:
    """The standard fp32 ONNX graph, parity-checked; with optimize, its weights in model.onnx.data,
    which the target graphs then share."""
    from sdrt.export import onnx_export

    files = onnx_export.export_component(name, spec, pipe, staging, opts.opset or onnx_export.DEFAULT_OPSET)
    err, tol = onnx_export.check_parity(name, spec, pipe, staging / files[0])
    if opts.optimize:
        from sdrt.kernels.graph import externalize

        externalize(staging / files[0])
        files = onnx_export.component_files(staging, name)
    return ComponentEntry(spec, files, opts.backend, "fp32", [], err, tol)


def fp16_stage(entry: ComponentEntry, pipe, staging: Path) -> ComponentEntry:
    """The component in fp16; the VAE decoder stays fp32 if fp16 overflows on probe inputs. The fp32
    files stay (the CUDA graph is made from them next; _precision_stages removes them)."""
    from sdrt.export import fp16, onnx_export

    name, spec = entry.spec.name, entry.spec
    src = staging / entry.files[0]
    dst = src.with_name("model.fp16.onnx")
    fp16.convert(src, dst)
    if name == "vae_decoder":
        probe = spec.sample_inputs(onnx_export.parity_sizes(spec), seed=2)
        if fp16.overflows(dst, probe, [t.name for t in spec.outputs]):
            for p in dst.parent.glob(dst.name + "*"):
                p.unlink()
            why = "the fp16 decoder overflowed (NaN/inf) on probe inputs"
            log.warning("vae_decoder kept in fp32: %s", why)
            return dataclasses.replace(entry, optimizations=[*entry.optimizations, f"fp32: {why}"])
    targets = dict(entry.targets)
    if name == "vae_decoder":  # kept: the runtime decodes with it where fp16 overflows on an image
        from sdrt.runtime.pipeline import FP32_FALLBACK

        targets[FP32_FALLBACK] = TargetGraph(entry.files[0], {}, entry.parity_max_abs)
    files = [str(p.relative_to(staging)) for p in (dst, dst.with_name(dst.name + ".data")) if p.exists()]
    err, tol = onnx_export.check_parity(name, spec, pipe, dst, "fp16")
    return dataclasses.replace(entry, files=files, precision="fp16", parity_max_abs=err, parity_tolerance=tol,
                               targets=targets,
                               optimizations=[*entry.optimizations, f"fp16 (kept in fp32: {', '.join(fp16.FP32_OPS)})"]
                               + (["the fp32 graph kept: the runtime decodes with it where fp16 overflows"]
                                  if name == "vae_decoder" else []))


def targets_stage(entry: ComponentEntry, pipe, staging: Path, latent_side: int, f: int,
                  targets: tuple[str, ...] | None = None) -> ComponentEntry:
    """Each target's rewritten graph (TARGETS, default every one of sdrt.kernels.TARGETS),
    parity-checked like the standard one."""
    from sdrt import kernels

    out = target_graphs(entry, pipe, staging, targets or tuple(kernels.TARGETS), latent_side)
    return dataclasses.replace(entry, targets={**entry.targets, **out},
                               optimizations=entry.optimizations + winograd_note(out, latent_side * f))


def target_graphs(entry: ComponentEntry, pipe, staging: Path, targets: tuple[str, ...],
                  latent_side: int) -> dict[str, TargetGraph]:
    """ENTRY's graph rewritten for each of TARGETS (sdrt.kernels), parity-checked; a target whose
    graph would equal another's (e.g. onnxruntime-cpu without convolutions to rewrite) or the standard
    one (e.g. openvino for a float graph) is left out."""
    from sdrt import kernels
    from sdrt.export import onnx_export
    from sdrt.kernels.int8_attention import UNOPTIMIZED_CHECK

    name, spec, out = entry.spec.name, entry.spec, {}
    for target in [t for t in kernels.TARGETS if t in targets]:  # a graph another equals comes later
        path, fused = kernels.optimize(staging / entry.files[0], target, latent_side)
        same = kernels.same_graph_as(target, fused) if any(fused.values()) else "standard"
        if same in out or same == "standard":
            path.unlink()
            log.info("%s for %s: the %s graph", name, target, same)
            continue
        err, _ = onnx_export.check_parity(name, spec, pipe, path, entry.precision,
                                          optimize=target not in UNOPTIMIZED_CHECK)
        log.info("%s for %s: %s", name, target, ", ".join(f"{k} x{v}" for k, v in fused.items()))
        out[target] = TargetGraph(str(path.relative_to(staging)), fused, err)
    return out


def winograd_note(targets: dict[str, TargetGraph], image_px: int) -> list[str]:
    if not any(t.fused.get("WinogradConv") for t in targets.values()):
        return []
    return [f"Winograd layers chosen for {image_px} px (onnxruntime-cpu graph; sdrt export --cpu-size)"]


def embeds_stage(entry: ComponentEntry, staging: Path) -> tuple[ComponentEntry, dict | None]:
    """The text encoder's `embeds` graph (sdrt.kernels.embeds: token embeddings in, for textual
    inversion), checked to give the standard graph's output for the same tokens; and where its token
    table is (relative to the engine dir). A graph it can't cut keeps no embeds graph (logged)."""
    import numpy as np

    from sdrt.kernels import embeds, target_file
    from sdrt.kernels.graph import externalize
    from sdrt.runtime.backends.onnxruntime import session

    src = staging / entry.files[0]
    if externalize(src):  # the table must sit in a weights file the runtime can map
        from sdrt.export.onnx_export import component_files

        entry = dataclasses.replace(entry, files=component_files(staging, entry.spec.name))
    dst = src.with_name(target_file(src.name, embeds.TARGET))
    try:
        record = embeds.build(src, dst)
    except SdrtError as e:
        log.warning("text_encoder: no embeds graph, so no textual inversion: %s", e)
        return entry, None
    record["file"] = str((src.parent / record["file"]).relative_to(staging))
    ids = entry.spec.sample_inputs({}, seed=1)["input_ids"]
    table = np.memmap(staging / record["file"], dtype=record["dtype"], mode="r", offset=record["offset"],
                      shape=tuple(record["shape"]))
    want = session(src).run(None, {"input_ids": ids})[0]
    got = session(dst).run(None, {embeds.EMBEDS: np.asarray(table[ids])})[0]
    err = float(np.max(np.abs(want.astype(np.float64) - got)))
    if err > 1e-4 * max(1.0, float(np.max(np.abs(want)))):
        raise SdrtError(f"export of text_encoder: the embeds graph differs from the standard one by {err:.3g}")
    graph = TargetGraph(str(dst.relative_to(staging)), {}, err)
    return dataclasses.replace(entry, targets={**entry.targets, embeds.TARGET: graph}), record


LORA_COMPONENTS = ("unet", "text_encoder")  # the components LoRAs adapt


def weight_map_stage(entry: ComponentEntry, pipe, staging: Path) -> ComponentEntry:
    """Where the component's layer weights are in its graph (sdrt.export.weight_map), for LoRAs per
    request: the standard graph's initializers, which the graph-only targets share by name."""
    from sdrt.export import weight_map
    from sdrt.kernels.graph import externalize

    name = entry.spec.name
    if externalize(staging / entry.files[0]):  # the runtime reads base weights from the weights file
        from sdrt.export.onnx_export import component_files

        entry = dataclasses.replace(entry, files=component_files(staging, name))
    path = weight_map.write(name, getattr(pipe, name), staging, entry.files[0])
    return dataclasses.replace(entry, weight_map=path)


def cuda_stage(entry: ComponentEntry, pipe, staging: Path, fp16: bool = True) -> TargetGraph:
    """The onnxruntime-cuda graph (sdrt.kernels.cuda), fused from the fp32 graph ENTRY and then made
    fp16 (fp16 False: a decoder that stays fp32), parity-checked like the other graphs (on ONNX
    Runtime's CUDA provider, or sdrt's NumPy references of its CUDA-only ops where there is none)."""
    from sdrt.export import onnx_export
    from sdrt.kernels import cuda, target_file

    name = entry.spec.name
    src = staging / entry.files[0]
    dst = src.with_name(target_file("model.onnx", cuda.TARGET))
    upcast = name == "unet" and bool(getattr(pipe.unet.config, "upcast_attention", False))
    fused = cuda.build(src, dst, fp16=fp16, fp32_attention=upcast)
    err, _ = onnx_export.check_parity(name, entry.spec, pipe, dst, "fp16" if fp16 else "fp32")
    return TargetGraph(str(dst.relative_to(staging)), fused, err)


def feature_cache_stage(entry: ComponentEntry, pipe, staging: Path, feature: str) -> ComponentEntry:
    """Feature caching's full and shallow graphs (sdrt.kernels.deepcache) for each of the UNet's ONNX
    graphs but TensorRT's, sharing its weights; each pair is checked against its graph."""
    from sdrt.components import TensorSpec
    from sdrt.kernels import deepcache
    from sdrt.kernels.int8_attention import UNOPTIMIZED_CHECK

    pairs = {}
    sample = entry.spec.inputs[0].shape
    # not TensorRT's graph (engines), nor the CUDA one (its ops have no CPU kernels to check it with):
    # a CUDA-provider run with caching uses the onnxruntime graph's pair
    skip = ("tensorrt", "onnxruntime-cuda")
    for target, file in [(None, entry.files[0])] + [(t, g.file) for t, g in entry.targets.items() if t not in skip]:
        full, shallow, weights, dtype = deepcache.write_pair(staging / file, feature)
        # the last up block's width, at the latents' resolution
        spec = TensorSpec(deepcache.FEATURE, dtype, (sample[0], pipe.unet.config.block_out_channels[0], *sample[2:]))
        err = _check_feature_cache(entry, staging / file, full, shallow, spec, target not in UNOPTIMIZED_CHECK)
        log.info("unet (%s): feature caching's shallow graph keeps %d weights; max error %.2g",
                 target or "standard", len(weights), err)
        pairs[file] = FeatureCache(str(full.relative_to(staging)), str(shallow.relative_to(staging)), spec,
                                   weights, err)
    return dataclasses.replace(entry, feature_cache=pairs)


def _check_feature_cache(entry: ComponentEntry, graph: Path, full: Path, shallow: Path, feature,
                         optimize: bool = True) -> float:
    """The full graph's output equals GRAPH's and the shallow graph fed the full graph's feature gives
    it again, within 1e-5 of its scale (fp16 graphs: 2e-3); returns the larger error. One session at
    a time (a UNet's weights each); OPTIMIZE=False: ONNX Runtime's graph optimizations off."""
    import numpy as np

    from sdrt.components import cache_specs
    from sdrt.runtime.backends.onnxruntime import session

    feeds = entry.spec.sample_inputs(entry.spec.sizes("min"), seed=3)
    want = session(graph, optimize=optimize).run(None, feeds)[0].astype(np.float64)
    out, feat = session(full, optimize=optimize).run(None, feeds)
    full_spec, _ = cache_specs(entry.spec, feature)
    bound = full_spec.check_feeds(feeds)
    if feat.shape != feature.resolve(bound) or feat.dtype != np.dtype(feature.dtype):
        raise SdrtError(f"export of unet: {full.name} gives a {feat.dtype}{list(feat.shape)} feature, "
                        f"expected {feature.dtype}{list(feature.resolve(bound))}")
    again = session(shallow, optimize=optimize).run(None, feeds | {feature.name: feat})[0]
    err = max(float(np.max(np.abs(out - want))), float(np.max(np.abs(again - want))))
    tol = (2e-3 if feature.dtype == "float16" else 1e-5) * max(1.0, float(np.max(np.abs(want))))
    if err > tol:
        raise SdrtError(f"export of unet: feature caching's graphs ({full.name}, {shallow.name}) differ from "
                        f"{graph.name} by {err:.3g} (tolerance {tol:.3g})")
    return err


def guided_stage(entry: ComponentEntry, staging: Path) -> ComponentEntry:
    """The guided variant (sdrt.kernels.guidance) of each UNet graph the CPU providers run (ONNX
    Runtime's CPU graph, OpenVINO's) and of its feature-caching pair, each checked against its graph
    on one guided batch (each graph's session made once: the full graph's outputs give the shallow
    graph its feature). Not for fp16 exports: their graphs run on GPUs, where it was never timed."""
    import numpy as np

    from sdrt.kernels import guidance
    from sdrt.kernels.int8_attention import UNOPTIMIZED_CHECK
    from sdrt.runtime.backends import PROVIDER_TARGETS
    from sdrt.runtime.backends.onnxruntime import session

    if entry.precision == "fp16":
        return entry
    batch = entry.spec.inputs[0].shape[0].name
    half = {k: v[:1] if k in guidance.SHARED else v
            for k, v in entry.spec.sample_inputs(entry.spec.sizes("min") | {batch: 2}, seed=5).items()}
    feeds = {k: np.concatenate([v, v]) if k in guidance.SHARED else v for k, v in half.items()}
    guided, plain = {}, {}  # plain: graph file -> its outputs on FEEDS (and the feature it reads)
    for targets in (PROVIDER_TARGETS["cpu"], PROVIDER_TARGETS["openvino"]):
        graph = entry.file_for(targets)
        pair = entry.feature_cache.get(graph)
        optimize = not any(entry.targets.get(t) and entry.targets[t].file == graph for t in UNOPTIMIZED_CHECK)

        def outputs(file, extra, optimize=optimize):
            if file not in plain:
                plain[file] = session(staging / file, optimize=optimize).run(None, feeds | extra)
            return plain[file]

        for file in [graph] + ([pair.full, pair.shallow] if pair else []):
            if file in guided:
                continue
            dst, shared = guidance.write_guided(staging / file)
            if dst is None:
                log.info("unet: %s reads the context first; no guided graph", file)
                continue
            extra = {pair.feature.name: outputs(pair.full, {})[1]} if pair and file == pair.shallow else {}
            got = session(dst, optimize=optimize).run(None, half | extra)
            err = _check_guided(file, dst, outputs(file, extra), got)
            log.info("unet: %s computes %d nodes once for both halves of a guided batch; max error %.2g",
                     dst.name, shared, err)
            guided[file] = str(dst.relative_to(staging))
    return dataclasses.replace(entry, guided=guided)


def _check_guided(file: str, guided: Path, want: list, got: list) -> float:
    """GUIDED's outputs on (x, t) once (GOT) equal FILE's on [x; x], [t; t] (WANT) within 1e-5 of
    their scale; returns the error."""
    import numpy as np

    err = max(float(np.max(np.abs(w.astype(np.float64) - g))) for w, g in zip(want, got, strict=True))
    tol = 1e-5 * max(1.0, *(float(np.max(np.abs(w))) for w in want))
    if not err <= tol:
        raise SdrtError(f"export of unet: {guided.name} differs from {Path(file).name} on a guided batch by "
                        f"{err:.3g} (tolerance {tol:.3g})")
    return err


# -- engine-wide stages --------------------------------------------------------------------------

def int8_stage(entries: dict[str, ComponentEntry], pipe, staging: Path, image_px: int) -> dict[str, ComponentEntry]:
    """The UNet and the VAE decoder as int8 QDQ graphs, calibrated on the staged fp32 engines; each
    replaces its fp32 component and its target graphs (the decoder only where its images keep
    quantize.MIN_PSNR_DB)."""
    from sdrt.export import quantize

    t0 = time.perf_counter()
    feeds = quantize.calibration_feeds(staging, image_px)
    unet, decoder = entries["unet"], entries["vae_decoder"]
    dst = (staging / unet.files[0]).with_name("model.int8.onnx")
    layers = quantize.quantize_unet(staging / unet.files[0], dst, feeds["unet"])
    note = (f"int8 static QDQ: {layers} Conv/MatMul/Gemm layers, calibrated on {len(feeds['unet'])} UNet inputs "
            f"from {len(quantize.CALIBRATION_PROMPTS)} {image_px} px trajectories")
    entries = {**entries, "unet": _int8_entry(unet, pipe, staging, dst, note)}
    log.info("%s in %.1f s", note, time.perf_counter() - t0)
    return {**entries, "vae_decoder": int8_decoder(decoder, pipe, staging, feeds["vae_decoder"], feeds["decoded"])}


def int8_decoder(decoder: ComponentEntry, pipe, staging: Path, feeds: list[dict],
                 decoded: list | None = None) -> ComponentEntry:
    """DECODER's int8 entry, calibrated on FEEDS; DECODER itself, noted, where the int8 images are under
    quantize.MIN_PSNR_DB from fp32's (DECODED: the fp32 decoder's outputs for FEEDS, if already computed)."""
    from sdrt.export import quantize

    src = staging / decoder.files[0]
    dst = src.with_name("model.int8.onnx")
    layers = quantize.quantize_decoder(src, dst, feeds)
    db = _decoder_psnr(src, dst, feeds, decoded)
    if db < quantize.MIN_PSNR_DB:
        log.warning("the int8 VAE decoder's images are %.1f dB from fp32's (under %.0f dB): the decoder stays fp32",
                    db, quantize.MIN_PSNR_DB)
        for f in (dst, dst.with_name(dst.name + ".data")):
            f.unlink(missing_ok=True)
        notes = decoder.optimizations + [f"fp32: its int8 graph was {db:.1f} dB PSNR from fp32 (under "
                                         f"{quantize.MIN_PSNR_DB:.0f} dB)"]
        return dataclasses.replace(decoder, optimizations=notes)
    note = (f"int8 static QDQ: {layers} Conv layers (attention and {', '.join(quantize.DECODER_KEEP_FP32)} in "
            f"fp32), {db:.1f} dB PSNR against fp32 on the {len(feeds)} calibration latents")
    log.info("VAE decoder %s", note)
    return _int8_entry(decoder, pipe, staging, dst, note)


def _decoder_psnr(fp32: Path, int8: Path, feeds: list[dict], decoded: list | None = None) -> float:
    """The lowest PSNR of INT8's images against FP32's over FEEDS (both decoders on ONNX Runtime's CPU
    provider); DECODED, where given, are FP32's outputs for FEEDS, which then does not run again."""
    from sdrt.export import quantize
    from sdrt.runtime.backends.onnxruntime import session

    if decoded is None:
        fp32_session = session(fp32)
        decoded = [fp32_session.run(None, f)[0] for f in feeds]
    int8_session = session(int8)
    return min(quantize.psnr(want, int8_session.run(None, f)[0]) for f, want in zip(feeds, decoded, strict=True))


def _int8_entry(fp32: ComponentEntry, pipe, staging: Path, dst: Path, note: str) -> ComponentEntry:
    """The entry for the int8 graph DST, which replaces FP32's files and target graphs (removed)."""
    from sdrt.export import onnx_export

    name, spec = fp32.spec.name, fp32.spec
    for f in fp32.files + [t.file for t in fp32.targets.values()] + [fp32.weight_map] * bool(fp32.weight_map):
        (staging / f).unlink()  # no weight map: LoRAs per request need float weights
    files = onnx_export.component_files(staging, name)  # model.int8.onnx, model.int8.onnx.data
    err, tol = onnx_export.check_parity(name, spec, pipe, dst, "int8")
    return ComponentEntry(spec, files, fp32.backend, "int8", [note], err, tol)


def tensorrt_stage(entries: dict[str, ComponentEntry], staging: Path, profile, vae_scale_factor: int,
                   progress: bool) -> dict[str, ComponentEntry]:
    """Each component's TensorRT engine, built from its TensorRT graph; the ONNX files stay beside it."""
    from tqdm.auto import tqdm

    from sdrt.export import tensorrt

    profile = profile or tensorrt.Profile()
    out = {}
    for name, c in tqdm(entries.items(), desc="tensorrt", unit="engine", disable=not progress):
        if name == DEPTH_ESTIMATOR:  # once per image: it stays an ONNX graph (ONNX Runtime runs it)
            out[name] = c
            continue
        onnx_file = staging / c.file_for("tensorrt")
        plan = onnx_file.parent / "model.plan"
        weights = [staging / f for f in c.files if f.endswith(".data")]
        t0 = time.perf_counter()
        hit = tensorrt.build_engine(onnx_file, weights, plan, c.spec, profile, vae_scale_factor)
        log.info("%s: TensorRT engine %s in %.1f s", name, "from cache" if hit else "built", time.perf_counter() - t0)
        spec = c.spec  # the UNet's prompt chunks: what its profile takes
        if "c" in spec.dims:
            spec = dataclasses.replace(spec, dims=spec.dims | {"c": profile.chunks})
        out[name] = dataclasses.replace(
            c, spec=spec, backend="tensorrt", files=[str(plan.relative_to(staging)), *c.files],
            optimizations=[*c.optimizations, f"TensorRT engine: batch {profile.batch}, {profile.pixels} px "
                                             "(min, opt, max)"])
    return out


# -- the whole export ------------------------------------------------------------------------------

def _precision_stages(fp32: ComponentEntry, pipe, staging: Path, optimize: bool):
    """fp16 exports: (the fp16 entry, its CUDA graph or None). The CUDA graph is fused from the fp32
    graph (its fusions match fp32 patterns) in the precision the component got; the fp32 files go
    after, unless the component kept them (a VAE decoder)."""
    entry = fp16_stage(fp32, pipe, staging)
    gpu = cuda_stage(fp32, pipe, staging, fp16=entry.precision == "fp16") if optimize else None
    if entry.files != fp32.files and fp32.files[0] not in {t.file for t in entry.targets.values()}:
        for f in fp32.files:
            (staging / f).unlink()
    return entry, gpu


def _components(pipe, dims: ModelDims, staging: Path, opts: Options) -> tuple[dict[str, ComponentEntry], dict | None]:
    """Every component's entry, and the token table's record (embeds_stage)."""
    from tqdm.auto import tqdm

    from sdrt.export import depth

    specs = component_specs(dims)
    latent_side = _latent_side(opts.cpu_size, dims.vae_scale_factor)
    entries, token_table = {}, None
    if depth.estimator(pipe) is not None:
        specs[DEPTH_ESTIMATOR] = depth.spec(pipe, depth.processor(pipe))
    with tqdm(total=len(specs), desc="export", unit="component", disable=not opts.progress) as bar:
        for name in specs:
            entry = onnx_stage(name, specs[name], pipe, staging, opts)
            if name == DEPTH_ESTIMATOR:  # once per image: fp32 (DPT-Hybrid's batch norms), the standard graph
                entries[name] = entry
                bar.update(1)
                continue
            gpu = None
            if opts.precision == "fp16":
                entry, gpu = _precision_stages(entry, pipe, staging, opts.optimize)
            if opts.optimize:
                entry = targets_stage(entry, pipe, staging, latent_side, dims.vae_scale_factor)
            if gpu is not None:
                entry = dataclasses.replace(entry, targets={**entry.targets, "onnxruntime-cuda": gpu})
            if name == "text_encoder":
                entry, token_table = embeds_stage(entry, staging)
            if name in LORA_COMPONENTS and opts.backend == "onnx":
                entry = weight_map_stage(entry, pipe, staging)
            entries[name] = entry
            bar.update(1)
            fault("component")
    return entries, token_table


def _manifest(loaded, pipe, dims, entries, lora_records, opts: Options, token_table: dict | None) -> Manifest:
    from sdrt.export import depth, onnx_export, sources

    return Manifest(
        source={"kind": loaded.kind, "name": loaded.name, "sha256": sources.content_hash(pipe)}
        | ({"config": str(Path(opts.config).resolve())} if opts.config else {})
        | ({"loras": lora_records} if lora_records else {}),
        pipeline={9: "inpaint", 5: "depth2img"}.get(dims.unet_in_channels, "txt2img"),
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor), dims=dims,
        scheduler_config=loaded.scheduler_config, components=entries,
        default_image_size=int(pipe.unet.config.sample_size) * dims.vae_scale_factor,
        exporter=_versions() | {"opset": opts.opset or onnx_export.DEFAULT_OPSET},
        depth_processor=depth.processor(pipe) if depth.estimator(pipe) is not None else None,
        token_table=token_table)


def _build(source: str, staging: Path, opts: Options) -> Manifest:
    """Everything the engine dir holds, written into STAGING; returns the manifest (written too)."""
    from sdrt.export import lora, sources

    t0 = time.perf_counter()
    scratch = staging / ".source"  # built-in models, single-file configs: removed before publishing
    scratch.mkdir()
    loaded = sources.load_source(source, scratch, opts.config)
    pipe = loaded.pipe
    if opts.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=opts.prediction_type)
    lora_records = lora.apply(pipe, list(opts.loras))
    log.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
    dims = model_dims(pipe)
    _check_kind(pipe, dims, opts)
    entries, token_table = _components(pipe, dims, staging, opts)
    pipe.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
    shutil.rmtree(scratch)
    manifest = _manifest(loaded, pipe, dims, entries, lora_records, opts, token_table)  # hashes the weights once
    caching = opts.backend == "onnx" and opts.optimize
    feature = _feature_name(staging / entries["unet"].files[0]) if caching else None  # before int8 replaces it
    if opts.precision == "int8":  # calibration runs the staged fp32 engines, which need a manifest to load
        manifest.write(staging)
        entries = _int8(entries, pipe, staging, manifest, opts)
    if feature is not None:
        entries["unet"] = feature_cache_stage(entries["unet"], pipe, staging, feature)
    if caching:
        entries["unet"] = guided_stage(entries["unet"], staging)
    if opts.backend == "tensorrt":
        entries = tensorrt_stage(entries, staging, opts.trt_profile, dims.vae_scale_factor, opts.progress)
    _share_files(staging)
    t1 = time.perf_counter()
    manifest = dataclasses.replace(manifest, components=entries, files=file_records(staging, skip=(LOCK,)))
    log.info("recorded the size and sha256 of %d files in %.1f s", len(manifest.files), time.perf_counter() - t1)
    manifest.write(staging)
    return manifest


def _int8(entries: dict[str, ComponentEntry], pipe, staging: Path, manifest: Manifest,
          opts: Options) -> dict[str, ComponentEntry]:
    """int8_stage, then each int8 component's graphs for the CPU providers, ONNX Runtime's and
    OpenVINO's (what runs QDQ int8)."""
    from sdrt.export import quantize
    from sdrt.runtime.backends import PROVIDER_TARGETS

    entries = int8_stage(entries, pipe, staging, quantize.calibration_size(manifest))
    if not opts.optimize:
        return entries
    f = manifest.dims.vae_scale_factor
    side = _latent_side(opts.cpu_size, f)
    cpu = PROVIDER_TARGETS["cpu"] + PROVIDER_TARGETS["openvino"]
    return entries | {name: targets_stage(e, pipe, staging, side, f, cpu)
                      for name, e in entries.items() if e.precision == "int8"}


def _feature_name(unet: Path) -> str | None:
    """The UNet's deep feature for feature caching; None (logged: no caching graphs) where the graph
    doesn't show it."""
    from sdrt.kernels import deepcache
    from sdrt.kernels.graph import load_graph_only

    try:
        return deepcache.feature_name(load_graph_only(unet))
    except SdrtError as e:
        log.warning("unet: no feature-caching graphs (cache_interval will be refused): %s", e)
        return None


def _check_kind(pipe, dims: ModelDims, opts: Options) -> None:
    """What the model's kind rules out, before the long exports; what it lacks, said once."""
    from sdrt.export import depth

    if opts.precision == "int8" and dims.unet_in_channels != 4:
        raise InputError("--precision int8 calibrates the UNet on text-to-image runs; this model's UNet takes "
                         f"{dims.unet_in_channels} input channels (inpainting or depth): export it as fp32 or fp16")
    if dims.unet_in_channels == 5 and depth.estimator(pipe) is None:
        log.warning("a depth2img model without a depth estimator (single files carry none): `sdrt generate` "
                    "will need --depth-map; to export the estimator, pass --config DIR, a diffusers depth2img "
                    "folder (e.g. stabilityai/stable-diffusion-2-depth) with depth_estimator/ and feature_extractor/")


def _share_files(staging: Path) -> None:
    """onnx and onnxruntime write some files 0600; engine dirs are shared like any other output."""
    umask = os.umask(0)
    os.umask(umask)
    for f in staging.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export(source: str, out_dir: str | Path, *, backend: str = "onnx", precision: str = "fp32",
           opset: int | None = None, force: bool = False, progress: bool = True,
           optimize: bool = True, trt_profile=None, cpu_size: int | None = None,
           config: str | Path | None = None, prediction_type: str | None = None,
           loras: list | None = None) -> Manifest:
    """Export SOURCE (diffusers folder, .safetensors / .ckpt file, hub id, `tiny`, `random-sd15`) to
    OUT_DIR; return its manifest. OUT_DIR appears complete or not at all (sdrt.export.outdir).

    config: a diffusers folder whose configs describe a single-file SOURCE (default: detected, SD 1.x
    or 2.x). prediction_type: "epsilon" or "v_prediction", overriding the source's scheduler config.
    loras: LoRA files fused into the UNet and text encoder first ("FILE[:SCALE]" strings or
    sdrt.export.lora.Lora).

    optimize: also write each target's rewritten graph (sdrt.kernels.TARGETS), parity-checked like
    the standard one. cpu_size: the image side the CPU graph's Winograd layers are chosen for
    (default: latent side 64, 512 px for SD). backend "tensorrt": also build a TensorRT engine per
    component from its TensorRT graph (needs a GPU; trt_profile: sdrt.export.tensorrt.Profile)."""
    from sdrt.export import lora

    opts = Options(backend, precision, opset, optimize, trt_profile, cpu_size, Path(config) if config else None,
                   prediction_type, tuple(x if isinstance(x, lora.Lora) else lora.Lora.parse(str(x))
                                          for x in loras or ()), progress)
    opts.check()
    out = OutDir(out_dir, force)
    out.check()
    _quiet_third_party(progress)
    t0 = time.perf_counter()
    with out as staging:
        manifest = _build(source, staging, opts)
        out.publish()
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return manifest
