"""`--backend tensorrt`: TensorRT engines built from each component's TensorRT graph (sdrt.kernels).

Written against the TensorRT 10 Python API (name-based tensors, strongly typed networks) and not
run on TensorRT yet: it could not be installed on the machines this project had, the lent H100
included (docs/verification.md); tested against stand-ins (tests/fake_tensorrt.py).

- The network is strongly typed: TensorRT keeps the ONNX graph's types, so an `--precision fp16`
  export gives fp16 engines whose fp32 islands (GroupNorm, attention softmax) stay fp32.
- One optimization profile per component from `Profile` (default batch 1-4 images, 256-1024 px, opt
  at the model's default size), configurable with `--trt-batch` / `--trt-sizes`; `shapes` turns it
  into each component's input shapes the way the pipeline calls it.
- A timing cache per GPU in the cache dir, and an engine cache keyed by the ONNX content hash, GPU,
  TensorRT version and profile: exporting the same weights again copies the cached engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdrt.checksums import sha256_files
from sdrt.components import ComponentSpec
from sdrt.errors import SdrtError

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Profile:
    batch: tuple[int, int, int] = (1, 1, 4)  # min, opt, max images per call (the UNet sees 2x with CFG)
    pixels: tuple[int, int, int] = (256, 512, 1024)  # min, opt, max image side
    chunks: tuple[int, int, int] = (1, 1, 3)  # min, opt, max 77-token prompt chunks (225 prompt tokens)


def cache_dir() -> Path:
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt")) / "tensorrt"


def shapes(spec: ComponentSpec, profile: Profile, scale_factor: int) -> dict[str, tuple]:
    """name -> (min, opt, max) shapes of every input, from the component's declared dims.

    The batch follows how the pipeline calls each component: the UNet runs the prompt and the
    negative prompt as one batch (2x the images; 1x with guidance off, hence min not doubled), the
    text encoder one prompt per call, the VAE one image (decoder) or all images (encoder)."""
    lo, opt, hi = profile.batch
    batch = {"unet": (lo, 2 * opt, 2 * hi), "text_encoder": (1, 1, hi), "vae_decoder": (1, 1, hi)}.get(
        spec.name, profile.batch)
    sizes = [{"B": batch[i], "h": profile.pixels[i] // scale_factor, "w": profile.pixels[i] // scale_factor,
              "c": profile.chunks[i]} for i in range(3)]
    return {t.name: tuple(t.resolve(s) for s in sizes) for t in spec.inputs}


def build_engine(onnx_path: Path, weights: list[Path], out_path: Path, spec: ComponentSpec, profile: Profile,
                 scale_factor: int) -> bool:
    """Build (or copy from the cache) the engine for ONNX_PATH; return True on a cache hit."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise SdrtError(f"TensorRT export needs a CUDA GPU ({err})")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    gpu = f"{name.strip(chr(0)).strip().replace(' ', '_')}-sm{props.major}{props.minor}"
    input_shapes = shapes(spec, profile, scale_factor)
    key = hashlib.sha256("|".join([sha256_files([onnx_path, *weights]), gpu, trt.__version__,
                                   repr(sorted(input_shapes.items()))]).encode()).hexdigest()[:32]
    cached = cache_dir() / f"{spec.name}-{key}.plan"
    if cached.is_file():
        shutil.copyfile(cached, out_path)
        log.info("%s: TensorRT engine from cache %s", spec.name, cached)
        return True

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SdrtError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in input_shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    timing_path = cache_dir() / f"timing-{gpu}-{trt.__version__}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SdrtError(f"TensorRT could not build an engine for {onnx_path} (see the log above)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    timing_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    out_path.write_bytes(memoryview(plan))
    shutil.copyfile(out_path, cached)
    return False
