"""Engine backends: load one component, describe its inputs, run it, close it.

The base class checks every call's inputs against the component's declared spec (from the
manifest) and keeps the time spent; a backend implements `_load`, `_run` and `close`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from sdrt.components import ComponentSpec
from sdrt.errors import InputError, SdrtError

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino", "openvino-fp32")
# OpenVINO on the CPU: "openvino" lets it compute in bf16 where the CPU has bf16 units (AVX512_BF16 /
# AMX; measured 3x faster than fp32 on the SD 1.5 UNet here), "openvino-fp32" keeps fp32
OPENVINO_PRECISION = {"openvino": "bf16", "openvino-fp32": "f32"}
# the graphs each provider runs, first present first (sdrt.kernels.TARGETS; none present: the
# exported standard ONNX graph). The export writes a target's graph only where its passes changed
# something (the text encoder has no onnxruntime-cpu graph: no convolutions), and engines exported
# before a target existed lack it. ONNX Runtime's TensorRT provider gets the TensorRT graph: contrib
# ops would split its engine.
PROVIDER_TARGETS = {"cpu": ("onnxruntime-cpu", "onnxruntime"), "cuda": ("onnxruntime",),
                    "tensorrt": ("tensorrt",), "openvino": (), "openvino-fp32": ()}


class Backend:
    def __init__(self, path: Path, spec: ComponentSpec, provider: str = "cpu"):
        self.path = Path(path)
        self.spec = spec
        self.provider = provider  # an sdrt provider name (PROVIDERS)
        self.seconds = 0.0  # time spent in run()
        self.calls = 0
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the order of spec.outputs."""
        try:
            self.spec.check_feeds(feeds)
        except ValueError as e:
            raise InputError(str(e)) from None
        t0 = time.perf_counter()
        out = self._run(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        """Positional inputs in spec order; the first output."""
        return self.run({t.name: a for t, a in zip(self.spec.inputs, args)})[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ONNX Runtime's CUDA provider. Measured on an H100, SD 1.5 fp16 at 512 px (benchmarks/results/gpu-h100):
# cuDNN's largest conv workspace and the power-of-two arena cost GPU memory for no speed (VAE decoder
# session 4.78 -> 3.46 GB, UNet batch 2 3.75 -> 3.40 GB, times within noise); NHWC (prefer_nhwc) was
# no faster on either.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "0",
                "arena_extend_strategy": "kSameAsRequested"}


def ort_providers(provider: str, cache_dir: Path) -> list:
    """ONNX Runtime execution providers for an sdrt provider name, most preferred first."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    if provider == "tensorrt":
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    raise InputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")


def ort_provider_name(provider: str) -> str:
    """The ONNX Runtime execution provider that serves an sdrt provider name."""
    first = ort_providers(provider, Path("."))[0]
    return first if isinstance(first, str) else first[0]


def gpu_libraries(ort, provider_name: str) -> str:
    """What ONNX Runtime's GPU provider needs loaded, for an error message."""
    cuda = f"CUDA {ort.cuda_version}" if getattr(ort, "cuda_version", "") else "the CUDA it was built for"
    needs = f"{cuda} and cuDNN 9 (pip install 'onnxruntime-gpu[cuda,cudnn]', or a system CUDA on the library path)"
    if provider_name == "TensorrtExecutionProvider":
        return f"TensorRT 10+ (libnvinfer) besides {needs}"
    return needs


def gpu_install_hint() -> str:
    """How to get ONNX Runtime's GPU build here. `onnxruntime` and `onnxruntime-gpu` install the same
    `onnxruntime` module, so with both installed whichever was installed last wins."""
    from importlib import metadata

    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]'"
    if installed == {"onnxruntime", "onnxruntime-gpu"}:
        return f"onnxruntime and onnxruntime-gpu are both installed and the CPU build's files won: {fix}"
    return f"on a machine with an NVIDIA GPU: {fix}"


def check_provider(provider: str) -> None:
    """Fail early, with the fix, when this machine cannot serve `provider`."""
    if provider in OPENVINO_PRECISION:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise SdrtError(f"provider {provider}: OpenVINO is not installed (pip install sdrt[openvino])") from None
        return
    import onnxruntime as ort

    if provider == "cuda":
        gpu_memory_mode()  # a bad SDRT_GPU_MEMORY is named before any engine loads
    wanted = ort_provider_name(provider)
    if wanted not in ort.get_available_providers():
        raise SdrtError(f"provider {provider}: this onnxruntime has no {wanted} "
                        f"(available: {', '.join(ort.get_available_providers())}); {gpu_install_hint()}")


_cuda_preloaded = False


def preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from NVIDIA's pip packages (`onnxruntime-gpu[cuda,cudnn]`) before the
    first GPU session: the dynamic loader does not search there, and without torch imported first
    nothing else puts them in the process. `onnxruntime.preload_dlls` (1.21+) does it, then falls back
    to the default search path (a system CUDA). It reports what it cannot find on stdout, which would
    mix into the CLI's output: that goes to the debug log instead."""
    global _cuda_preloaded
    if _cuda_preloaded or not hasattr(ort, "preload_dlls"):
        return
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            ort.preload_dlls()
        except Exception as e:  # a missing library shows again, named, when the session is created
            print(e)
    if said.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", said.getvalue().strip())
    _cuda_preloaded = True


_shared_cpu_arena = False
# ONNX Runtime's memory pattern pre-plans one block for a whole run. Allocating per tensor from the
# arena instead frees as it goes: measured on SD 1.5 at 512 px, that lowers the UNet session's peak
# (batch 2: 4.97 -> 4.22 GB, same speed) but raises the VAE decoder's (1.35 -> 1.73 GB of activations)
NO_MEMORY_PATTERN = {"unet"}


def _use_shared_cpu_arena(ort, opts) -> None:
    """All sessions of the process allocate CPU activations from one arena: a pipeline runs one
    component at a time, so its peak is the largest component's working set, not the sum of four
    arenas each sized to its own peak (SD 1.5 at 512 px: 8.5 -> 7.1 GB). The arena grows in
    power-of-two regions (ONNX Runtime's default) rather than by exactly what is asked: fewer, larger
    regions let freed neighbours merge, and a region's untouched pages cost no memory. Measured on
    SD 1.5 at 512 px, first VAE decode after the UNet: 6.06 -> 5.70 GB peak, UNet step 4.68 -> 4.62 GB."""
    global _shared_cpu_arena
    if not _shared_cpu_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
        _shared_cpu_arena = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


_shared_cuda_arena = False
# SDRT_GPU_MEMORY=low (default): all CUDA sessions of the process allocate from one registered CUDA
# arena, which release_free_memory shrinks between phases (text, sampling, decoding), as on the CPU.
# "fast": each session keeps its own arena at its high-water mark. Measured on an H100, SD 1.5 fp16,
# 512 px, 20 steps, peak GPU memory of a cold-start process / per image after the first
# (benchmarks/results/gpu-h100-2): low 4.89 GB / 0.46-0.48 s, fast 6.77 GB / 0.43-0.44 s; one shared
# arena not shrunk 5.72 GB / 0.45-0.47 s; shrinking after every UNet step instead made each step about
# 20% slower (gpu-h100/arena.jsonl).
GPU_MEMORY_MODES = ("low", "fast")


def gpu_memory_mode() -> str:
    mode = os.environ.get("SDRT_GPU_MEMORY", "low")
    if mode not in GPU_MEMORY_MODES:
        raise InputError(f"SDRT_GPU_MEMORY={mode!r}: choose one of {', '.join(GPU_MEMORY_MODES)}")
    return mode


def _use_shared_cuda_arena(ort, opts) -> None:
    global _shared_cuda_arena
    if not _shared_cuda_arena:
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, CUDA_OPTIONS,
                                                 ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        except Exception as e:  # the CUDA provider's libraries did not load: creating the session says so
            log.debug("no shared CUDA arena: %s", e)
            return
        _shared_cuda_arena = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


_malloc_trim = None
_arena_release = {}  # device -> (session, run options) that end a no-op run by shrinking that shared arena
# A one-node ONNX model (Identity on a float [1], IR 7, opset 13; tests rebuild it with onnx.helper).
# ONNX Runtime shrinks an arena only at the end of a run with `memory.enable_memory_arena_shrinkage`;
# running this on a session that shares the CPU arena hands the arena's free regions back without
# running a real component.
NOOP_MODEL = bytes.fromhex(
    "080712003a3d0a100a017812017922084964656e74697479120772656c656173655a0f0a0178120a0a08080112040a0208"
    "01620f0a0179120a0a08080112040a02080142040a00100d")


def _shrink_shared_arena(device: str) -> None:
    """Run the no-op model on a session sharing `device`'s ("cpu" / "gpu") arena, asking ONNX Runtime
    to shrink that arena at the end of the run."""
    if device not in _arena_release:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if device == "cpu":
            _use_shared_cpu_arena(ort, opts)
            providers = ["CPUExecutionProvider"]
        else:
            _use_shared_cuda_arena(ort, opts)
            providers = [("CUDAExecutionProvider", CUDA_OPTIONS)]
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"{device}:0")
        _arena_release[device] = (ort.InferenceSession(NOOP_MODEL, opts, providers=providers), run_options)
    session, run_options = _arena_release[device]
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)


def release_free_memory() -> None:
    """Hand back the memory the CPU sessions keep between calls: the shared arena's free regions
    (CPU sessions keep them from call to call: shrinking after every UNet call made each step
    re-fault its pages, 5.49 against 4.85 s at batch 2, 512 px: README, "Memory"), then what the C allocator holds
    freed (glibc's malloc_trim; a no-op elsewhere): the model protobuf ONNX Runtime drops after
    creating a session, small buffers. The pipeline calls it between phases (text, sampling,
    decoding), so each phase's peak does not sit on the last one's leftovers, and after a session
    is created."""
    global _malloc_trim
    if _shared_cpu_arena:
        _shrink_shared_arena("cpu")
    if _shared_cuda_arena:
        _shrink_shared_arena("gpu")
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class OrtBackend(Backend):
    """ONNX Runtime InferenceSession on the CPU, CUDA or TensorRT execution provider."""

    def _load(self) -> None:
        import onnxruntime as ort

        check_provider(self.provider)
        if self.provider != "cpu":
            preload_cuda_libraries(ort)
        providers = ort_providers(self.provider, self.path.parent / "trt_cache")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.provider == "cpu":
            _use_shared_cpu_arena(ort, opts)
            opts.enable_mem_pattern = self.spec.name not in NO_MEMORY_PATTERN
        elif self.provider == "cuda" and gpu_memory_mode() == "low":
            _use_shared_cuda_arena(ort, opts)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise InputError(f"cannot load {self.path} (corrupt or not an ONNX model?): {e}") from None
        wanted = ort_provider_name(self.provider)
        if self.session.get_providers()[0] != wanted:  # ONNX Runtime falls back when a provider's libraries
            # are missing, with a line on stdout: a GPU run silently on the CPU would be worse than an error
            raise SdrtError(f"provider {self.provider}: ONNX Runtime could not start {wanted} for {self.path} "
                            f"and fell back to {self.session.get_providers()[0]}; it needs "
                            f"{gpu_libraries(ort, wanted)}")
        self._outputs = [t.name for t in self.spec.outputs]
        if self.provider == "cpu":
            release_free_memory()

    def _run(self, feeds):
        return self.session.run(self._outputs, feeds)

    def close(self) -> None:
        self.session = None


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin compiling the same ONNX file (bf16 or fp32 inference precision)."""

    def _load(self) -> None:
        check_provider(self.provider)
        import openvino as ov

        core = ov.Core()
        precision = OPENVINO_PRECISION[self.provider]
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            precision = "f32"  # no bf16 units: OpenVINO would emulate it slowly
        self.precision = precision
        try:
            self.model = core.compile_model(str(self.path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                    "PERFORMANCE_HINT": "LATENCY"})
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise InputError(f"cannot load {self.path} with OpenVINO: {e}") from None
        self.request = self.model.create_infer_request()
        self._outputs = [self.model.output(t.name) for t in self.spec.outputs]

    def _run(self, feeds):
        result = self.request.infer(feeds)
        return [np.asarray(result[o]) for o in self._outputs]

    def close(self) -> None:
        self.request = self.model = None


class TensorRtBackend(Backend):
    """A serialized TensorRT engine (`sdrt export --backend tensorrt`), run with TensorRT's Python API
    and cuda-python's runtime bindings (no torch). Device buffers are kept and grown per input shape;
    a call repeating the previous shapes replays a captured CUDA graph.

    Written against the TensorRT 10 and cuda-python 12 docs; not run on TensorRT yet (it could not be
    installed on the machines this project had, the lent H100 included: README). Tested against
    stand-ins (tests/fake_tensorrt.py); its CUDA calls (buffers, copies, graph capture and replay,
    release) also ran on an H100 through cuda-bindings 13.3.1, with a stand-in engine kernel."""

    def _load(self) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise SdrtError("TensorRT engines need `pip install sdrt[tensorrt]` on a machine with CUDA") from None
        self.trt, self.cudart = trt, cudart
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise InputError(f"cannot load {self.path}: not an engine for this GPU / TensorRT version "
                             "(re-export with --backend tensorrt here)")
        self.context = self.engine.create_execution_context()
        self.stream = self._check(cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)
        self.graph_exec, self.graph_shapes = None, None
        self.graphs = True  # False once a capture failed

    def _check(self, result):
        err, *value = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise SdrtError(f"CUDA error {err} in {self.path}")
        return value[0] if len(value) == 1 else value

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self.cudart.cudaFree(ptr))
            ptr = self._check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
            self._drop_graph()  # addresses changed: the captured graph is stale
        return ptr

    def _run(self, feeds):
        trt, cudart = self.trt, self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = tuple(feeds[t.name].shape for t in self.spec.inputs)
        for t in self.spec.inputs:
            arr = np.ascontiguousarray(feeds[t.name], dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
            if not self.context.set_input_shape(t.name, arr.shape):
                raise InputError(f"{self.spec.name}.{t.name}: shape {list(arr.shape)} is outside the TensorRT "
                                 f"engine's profile ({self.path}; re-export with wider --trt-batch / --trt-sizes)")
            ptr = self._buffer(t.name, arr.nbytes)
            self._check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
        outputs = []
        for t in self.spec.outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(t.name)),
                           dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
            outputs.append((self._buffer(t.name, out.nbytes), out))
        if self.graph_exec is not None and shapes == self.graph_shapes:
            self._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        elif shapes == self.graph_shapes and self.graphs:  # second call with these shapes: capture it
            self._capture()
        else:
            self._drop_graph()
            self.graph_shapes = shapes
            self._execute()
        for ptr, out in outputs:
            self._check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
        self._check(cudart.cudaStreamSynchronize(self.stream))
        return [out.astype(np.float32, copy=False) for _, out in outputs]

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise SdrtError(f"TensorRT failed to run {self.path}")

    def _capture(self) -> None:
        """Record this call's execution as a CUDA graph and launch it; later calls with the same
        shapes replay it. An engine TensorRT can't capture (e.g. data-dependent shapes) runs without
        graphs from then on."""
        cudart = self.cudart
        self._check(cudart.cudaStreamBeginCapture(
            self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = self.context.execute_async_v3(self.stream)
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:
            if err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.path, err)
            self.graphs = False
            self._execute()
            return
        try:
            self.graph_exec = self._check(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            self._check(cudart.cudaGraphDestroy(graph))  # the instantiated graph doesn't need it
        self._check(cudart.cudaGraphLaunch(self.graph_exec, self.stream))

    def _drop_graph(self) -> None:
        if self.graph_exec is not None:
            self._check(self.cudart.cudaGraphExecDestroy(self.graph_exec))
            self.graph_exec = None

    def close(self) -> None:
        if self.context is None:
            return
        self._drop_graph()
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.cudart.cudaStreamDestroy(self.stream)
        self.buffers = {}
        self.context = self.engine = None


def load_backend(path: Path, spec: ComponentSpec, backend: str, provider: str) -> Backend:
    if backend == "onnx" and provider in OPENVINO_PRECISION:
        return OpenVinoBackend(path, spec, provider)
    if backend == "onnx":
        return OrtBackend(path, spec, provider)
    if backend == "tensorrt":
        if provider != "tensorrt":
            raise InputError(f"{path} is a TensorRT engine: run it with --provider tensorrt")
        return TensorRtBackend(path, spec, provider)
    raise SdrtError(f"{path}: backend {backend!r} is not supported by this sdrt")
