"""`sdrt bench`: sdrt's engines against the eager PyTorch path they were exported from, side by side
in one run: per-component and end-to-end times, ratios taken round by round, achieved GFLOP/s against
a GEMM probe, time to first image and peak RSS from cold starts. Writes JSON, Markdown and a chart."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.bench import measure
from sdrt.bench.optimum_peer import MODES as OPTIMUM_MODES
from sdrt.errors import InputError, SdrtError
from sdrt.manifest import Manifest

log = logging.getLogger(__name__)
BASELINE = "eager"
GPU_PROVIDERS = ("cuda", "tensorrt")
PROMPT = "a photo of an astronaut riding a horse on mars"
WARMUP_STEPS = 2  # a warm-up generation: the same shapes (compilations, first calls), fewer steps


@dataclass
class Settings:
    sizes: list[int] = field(default_factory=list)  # image sides in px; [] = the model's default size
    repeats: int = 3
    warmup: int = 1  # untimed rounds first; a generation's are WARMUP_STEPS long (same shapes, compiled)
    steps: int = 10  # end-to-end generations (and cold starts)
    more_steps: list[int] = field(default_factory=list)  # further end-to-end step counts (e.g. 20 and 50)
    batches: list[int] = field(default_factory=lambda: [1])  # end-to-end batch sizes (images per call)
    sampler: str = "dpmpp_2m_karras"
    providers: list[str] = field(default_factory=lambda: ["cpu"])  # one sdrt path per runtime provider
    plain: bool = False  # also the standard graphs (no sdrt.kernels rewrites) on the first provider
    also: list[str] = field(default_factory=list)  # more engine dirs (e.g. int8), on every provider
    eager: bool = True  # include the eager PyTorch baseline (needs the export extra)
    peer: bool = True  # diffusers' OnnxStableDiffusionPipeline on the standard graphs (cpu / cuda providers)
    cold: bool = True  # cold-start subprocesses: time to first image, peak RSS
    cold_steps: int | None = None  # their generation's steps (default: steps; peak RSS doesn't depend on it)
    components: bool = True  # the per-component workloads
    end_to_end: bool = True
    cache_intervals: list[int] = field(default_factory=list)  # each sdrt path's generations with feature caching
    optimum: list[str] = field(default_factory=lambda: list(OPTIMUM_MODES))  # optimum-intel peers (CPU runs)
    optimum_python: str | None = None  # the interpreter that has optimum-intel (sdrt.bench.optimum_peer)

    @property
    def device(self) -> str:
        """Where the baseline and the GEMM probe run: "cuda" when any provider is a GPU one ("auto" is
        where ONNX Runtime has the CUDA provider: what resolve_provider picks first for ONNX engines)."""
        if any(p in GPU_PROVIDERS for p in self.providers):
            return "cuda"
        if "auto" in self.providers:
            from sdrt.runtime.backends.onnxruntime import has_cuda

            return "cuda" if has_cuda() else "cpu"
        return "cpu"


def _paths(engine_dir: Path, manifest: Manifest, settings: Settings, skipped: list[str]) -> list:
    from sdrt.bench.paths import EagerPath, EnginePath

    variants = [(engine_dir, p, True, "sdrt") for p in settings.providers]
    if settings.plain:
        variants.append((engine_dir, settings.providers[0], False, "sdrt-plain"))
    main = manifest.components.get("unet")
    used = {label for *_, label in variants}
    for d in settings.also:
        unet = Manifest.read(d).components.get("unet")
        # named by its precision where that tells it apart (an int8 export), else by its folder
        label = f"sdrt-{unet.precision}" if unet and main and unet.precision != main.precision else None
        if label is None or label in used:
            label = f"sdrt-{Path(d).name}"
        used.add(label)
        variants += [(Path(d), p, True, label) for p in settings.providers]
    paths = []
    for d, provider, optimized, label in variants:
        try:
            paths.append(EnginePath(d, provider, optimized, label))
        except SdrtError as e:  # a provider this machine lacks: say so, measure the rest
            skipped.append(f"{label} on {provider}: {e}")
            log.warning("skipping %s on %s: %s", label, provider, e)
    if not paths:
        raise InputError("no sdrt path could be loaded: " + "; ".join(skipped))
    paths += [p.cached(n) for p in list(paths) for n in settings.cache_intervals if n > 1]
    if settings.optimum and settings.device == "cpu" and settings.end_to_end:
        paths += _optimum(engine_dir, manifest, settings, skipped)
    if settings.peer:
        paths += _peers(engine_dir, manifest, settings, skipped)
    if settings.eager:
        try:  # GPU providers are compared with eager PyTorch fp16 on the GPU, CPU ones with fp32
            paths.append(EagerPath(manifest, engine_dir, settings.device))
        except (ImportError, InputError) as e:
            skipped.append(f"eager: {e}")
            log.warning("skipping the eager PyTorch path: %s", e)
    return paths


def _optimum(engine_dir: Path, manifest: Manifest, settings: Settings, skipped: list[str]) -> list:
    from sdrt.bench import optimum_peer as optimum

    try:
        python = optimum.find_python(settings.optimum_python)
        return [optimum.OptimumPath(manifest, engine_dir, mode, python) for mode in settings.optimum]
    except (InputError, RuntimeError) as e:
        skipped.append(str(e))
        log.warning("skipping %s", e)
        return []


def _peers(engine_dir: Path, manifest: Manifest, settings: Settings, skipped: list[str]) -> list:
    from sdrt.bench import peer

    out = []
    for provider in [p for p in settings.providers if p in peer.ORT_PROVIDERS]:
        try:
            path = peer.DiffusersOnnxPath(engine_dir, manifest, provider)
            if settings.end_to_end or settings.cold:
                path.check_sampler(settings.sampler)
            out.append(path)
        except InputError as e:
            skipped.append(str(e))
            log.warning("skipping %s", e)
    return out


def _components(paths, manifest, settings, gemm, progress, out: dict, saved) -> None:
    """Fill OUT with one entry per component workload; saved() after each."""
    specs = {k: c.spec for k, c in manifest.components.items()}
    eager = next((p for p in paths if p.name == BASELINE), None)
    current = None
    measured = [p for p in paths if p.components]
    for wl in measure.component_workloads(specs, settings.sizes, manifest.dims.vae_scale_factor):
        if current and current != wl.component:
            for p in paths:  # one component's sessions / modules in memory at a time
                p.unload(current)
        current = wl.component
        flops = eager.count_flops(wl.component, wl.feeds) if eager else None
        samples = measure.rounds(measured, lambda p, wl=wl: p.run(wl.component, wl.feeds),
                                 settings.warmup, settings.repeats, progress)
        entry = {"component": wl.component, "size": wl.size, "batch": wl.batch, "flops": flops,
                 "paths": {k: measure.summary(v) for k, v in samples.items() if v},
                 "ratios": measure.pair_ratios(samples, BASELINE)}
        if flops:
            entry["gflops"] = {k: flops / s["median"] / 1e9 for k, s in entry["paths"].items()}
            entry["fraction_of_peak"] = {k: g / gemm["gflops"] for k, g in entry["gflops"].items()}
        out[wl.name] = entry
        saved()
    for p in paths:
        p.unload(current)


def _end_to_end(paths, settings, progress, out: dict, saved) -> None:
    """Fill OUT with one entry per (size, batch, steps) generation; saved() after each."""
    for size in settings.sizes:
        for batch in settings.batches:
            for steps in [settings.steps, *settings.more_steps]:
                images = {}
                samples = measure.rounds(
                    paths, lambda p, s=size, b=batch, n=steps: p.generate(PROMPT, n, s, b, settings.sampler, 0),
                    settings.warmup, settings.repeats, progress, kept=images,
                    warm=lambda p, s=size, b=batch, n=min(steps, WARMUP_STEPS): p.generate(PROMPT, n, s, b,
                                                                                          settings.sampler, 0))
                summaries = {k: measure.summary(v) for k, v in samples.items() if v}
                key = f"generate_b{batch}@{size}" + (f"x{steps}" if steps != settings.steps else "")
                out[key] = {
                    "size": size, "batch": batch, "steps": steps, "sampler": settings.sampler,
                    "paths": summaries, "ratios": measure.pair_ratios(samples, BASELINE),
                    "images_per_minute": {k: 60 * batch / s["median"] for k, s in summaries.items()},
                    "psnr": _psnr(paths, images),
                    # round by round against each optimum-intel configuration (the CPU peer)
                    "ratios_vs_peer": {k: measure.pair_ratios(samples, k) for k in samples if k.startswith("optimum")}}
                saved()


def _psnr(paths, images: dict) -> dict:
    """Each path's image (the same seed's) against eager fp32's, and a cached path's against its own
    full-compute image, in dB."""
    out = {}
    for p in paths:
        if p.name not in images:
            continue
        row = {}
        if BASELINE in images and p.name != BASELINE:
            row["vs_eager"] = measure.psnr(images[p.name], images[BASELINE])
        base = getattr(p, "base", p.name)
        if base != p.name and base in images:
            row["vs_full_compute"] = measure.psnr(images[p.name], images[base])
        out[p.name] = row
    return out


def _attention(provider: str) -> str:
    """"; " + which kernel runs the large attentions, on OpenVINO's providers."""
    from sdrt.runtime.backends import amx_attention, openvino

    return f"; {amx_attention.describe()}" if provider in openvino.OPENVINO_PRECISION else ""


def run(engine_dir: str | Path, settings: Settings, progress=None, checkpoint=None) -> dict:
    """Measure; return the results dict (also what `report.write` turns into files).
    checkpoint(results) is called after every finished workload with what is measured so far."""
    from sdrt.bench.paths import EnginePath

    engine_dir = Path(engine_dir)
    manifest = Manifest.read(engine_dir)
    if manifest.pipeline != "txt2img":  # its UNet takes a mask and masked-image latents beside the latents
        raise InputError(f"{engine_dir}: a model for {manifest.pipeline}; sdrt bench measures txt2img models")
    settings.sizes = settings.sizes or [manifest.default_image_size]
    for s in settings.sizes:
        if s % manifest.dims.vae_scale_factor:
            raise InputError(f"--sizes {s}: not a multiple of the VAE scale factor {manifest.dims.vae_scale_factor}")
    skipped = [f"{c}: not in the engine dir" for c in sorted({c for _, c, _ in measure.COMPONENT_WORKLOADS})
               if c not in manifest.components]
    results = {"machine": measure.machine(), "settings": asdict(settings), "engine_dir": str(engine_dir),
               "source": manifest.source, "skipped": skipped, "gemm": measure.gemm_peak(device=settings.device)}
    paths = _paths(engine_dir, manifest, settings, skipped)
    results["paths"] = [p.name for p in paths]
    # what each engine path runs on, and why (--providers auto: resolve_provider's reason)
    results["providers"] = {p.name: f"{p.pipe.provider} ({p.pipe.provider_choice}{_attention(p.pipe.provider)})"
                            for p in paths if isinstance(p, EnginePath) and p.cache_interval == 1}

    def saved():
        if checkpoint is not None:
            checkpoint(results)

    try:
        if settings.components:
            results["components"] = {}
            _components(paths, manifest, settings, results["gemm"], progress, results["components"], saved)
        if settings.end_to_end:
            results["end_to_end"] = {}
            _end_to_end(paths, settings, progress, results["end_to_end"], saved)
    finally:
        for p in paths:
            p.close()
    if settings.cold:
        results["cold_start"] = {}
        for p in paths:
            try:
                results["cold_start"][p.name] = measure.cold_start(p, settings.sizes[0],
                                                                   settings.cold_steps or settings.steps,
                                                                   settings.sampler)
            except (RuntimeError, OSError, ValueError) as e:
                skipped.append(f"cold start {p.name}: {e}")
            saved()
    return results


def total_rounds(manifest: Manifest, settings: Settings) -> int:
    """How many timed + warm-up calls `run` makes over all its paths (for a progress bar)."""
    sizes = settings.sizes or [manifest.default_image_size]
    specs = {k: c.spec for k, c in manifest.components.items()}
    generations = len(sizes) * len(settings.batches) * (1 + len(settings.more_steps)) * settings.end_to_end
    workloads = len(measure.component_workloads(specs, sizes, manifest.dims.vae_scale_factor)) * settings.components
    n = workloads + generations
    from sdrt.bench.peer import ORT_PROVIDERS

    peers = settings.peer * sum(p in ORT_PROVIDERS for p in settings.providers)
    paths = len(settings.providers) * (1 + len(settings.also)) + settings.plain + settings.eager + peers
    cached = len(settings.providers) * (1 + len(settings.also)) * len([c for c in settings.cache_intervals if c > 1])
    optimum = len(settings.optimum) * (settings.device == "cpu")  # an estimate: skipped when not installed
    return (n * paths + generations * (cached + optimum)) * (settings.warmup + settings.repeats)
