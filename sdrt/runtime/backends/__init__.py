"""Engine backends (the interface in `base`), one module per runtime, and the memory policy.

    onnxruntime  ONNX Runtime sessions on the CPU, CUDA or TensorRT execution providers
    openvino     OpenVINO's CPU plugin on the same ONNX files (bf16 / fp32)
    tensorrt     serialized TensorRT engines through TensorRT's API and cuda-python
    memory       shared arenas and handing memory back between phases
"""

from __future__ import annotations

from pathlib import Path

from sdrt.components import ComponentSpec
from sdrt.errors import InputError, SdrtError
from sdrt.runtime.backends.base import Backend
from sdrt.runtime.backends.memory import MEMORY, release_free_memory

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino", "openvino-fp32")
AUTO = "auto"  # resolve_provider picks one of PROVIDERS for the engine dir and this machine
# the graphs each provider runs, first present first (sdrt.kernels.TARGETS; none present: the
# exported standard ONNX graph). The export writes a target's graph only where its passes changed
# something (the text encoder has no onnxruntime-cpu graph: no convolutions), and engines exported
# before a target existed lack it. ONNX Runtime's TensorRT provider gets the TensorRT graph: contrib
# ops would split its engine. The CUDA provider's own graph (sdrt.kernels.cuda) comes only with fp16
# exports.
PROVIDER_TARGETS = {"cpu": ("onnxruntime-cpu", "onnxruntime"), "cuda": ("onnxruntime-cuda", "onnxruntime"),
                    "tensorrt": ("tensorrt",), "openvino": ("openvino",), "openvino-fp32": ("openvino",)}

__all__ = ["AUTO", "MEMORY", "PROVIDERS", "PROVIDER_TARGETS", "Backend", "check_provider", "check_weights",
           "cpu_features", "load_backend", "release_free_memory", "resolve_provider"]


def check_provider(provider: str) -> None:
    """Fail early, with the fix, when this machine cannot serve `provider`."""
    from sdrt.runtime.backends import onnxruntime, openvino

    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if provider in openvino.OPENVINO_PRECISION:
        openvino.check_openvino(provider)
    else:
        onnxruntime.check_ort_provider(provider)


CPU_FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")  # what the choice reads
INT8_UNITS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products in one instruction


def cpu_features() -> list[str]:
    """The CPU's features among CPU_FEATURES (Linux's /proc/cpuinfo flags; none elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return [f for f in CPU_FEATURES if f in flags]


def resolve_provider(provider: str, manifest) -> tuple[str, str]:
    """PROVIDER, or for "auto" the fastest provider that meets the quality bar for MANIFEST's engines
    on this machine (measured: docs/benchmarks.md, "CPU"); and the reason, to log and record."""
    if provider != AUTO:
        return provider, "given"
    unet = manifest.components["unet"]
    if unet.backend == "tensorrt":
        return "tensorrt", "TensorRT engines"
    from sdrt.runtime.backends.onnxruntime import has_cuda

    if has_cuda():
        return "cuda", "ONNX Runtime has the CUDA provider"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "cpu", "OpenVINO is not installed (pip install sdrt[openvino]): ONNX Runtime's CPU graphs"
    features = cpu_features()
    if unet.precision == "int8":
        # measured (docs/kernels.md, "int8"): with VNNI (Zen 4) OpenVINO's int8 kernels lead ONNX
        # Runtime's; on AVX2 alone (Zen 3) ONNX Runtime's lead OpenVINO's
        units = [f for f in features if f in INT8_UNITS]
        if units:
            return "openvino", f"int8 UNet and int8 units ({', '.join(units)}): OpenVINO's int8 kernels"
        return "cpu", "int8 UNet without VNNI or AMX: ONNX Runtime's int8 kernels (AVX2)"
    if "amx_bf16" in features or "avx512_bf16" in features:
        return "openvino", f"bf16 units ({', '.join(features)}): OpenVINO computes in bf16"
    return "cpu", f"no bf16 units ({', '.join(features) or 'no AVX-512'}): ONNX Runtime's fp32 CPU graphs"


def check_weights(backend: str, provider: str) -> None:
    """Only ONNX Runtime's sessions take initializers replacing the graph's (LoRAs per request)."""
    from sdrt.runtime.backends import openvino

    if backend != "onnx" or provider in openvino.OPENVINO_PRECISION:
        raise InputError(f"LoRAs per request run on ONNX Runtime's providers (cpu, cuda), not on "
                         f"{'TensorRT engines' if backend == 'tensorrt' else provider}: fuse them at export instead "
                         "(sdrt export --lora FILE:WEIGHT)")


def load_backend(path: Path, spec: ComponentSpec, backend: str, provider: str, weights: dict | None = None) -> Backend:
    """WEIGHTS: initializers replacing the graph's (LoRAs per request; check_weights)."""
    from sdrt.runtime.backends import onnxruntime, openvino, tensorrt

    if weights:
        check_weights(backend, provider)
    if backend == "onnx" and provider in openvino.OPENVINO_PRECISION:
        return openvino.OpenVinoBackend(path, spec, provider)
    if backend == "onnx":
        return onnxruntime.OrtBackend(path, spec, provider, weights)
    if backend == "tensorrt":
        if provider != "tensorrt":
            raise InputError(f"{path} is a TensorRT engine: run it with --provider tensorrt")
        return tensorrt.TensorRtBackend(path, spec, provider)
    raise SdrtError(f"{path}: backend {backend!r} is not supported by this sdrt")
