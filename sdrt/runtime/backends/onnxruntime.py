"""ONNX Runtime: the one session factory (runtime, export parity checks, the fp16 probe and the bench's
peer path all create sessions here), the provider table, and the backend."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdrt.errors import InputError, SdrtError, first_line
from sdrt.runtime.backends.base import Backend
from sdrt.runtime.backends.binding import IoBinder
from sdrt.runtime.backends.memory import CUDA_OPTIONS, MEMORY, gpu_memory_mode

log = logging.getLogger(__name__)

ORT_PROVIDERS = ("cpu", "cuda", "tensorrt")  # the sdrt providers ONNX Runtime serves


def has_cuda() -> bool:
    """Whether ONNX Runtime here has its CUDA provider (the GPU build, with a GPU)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_providers(provider: str, cache_dir: Path | None = None, cuda_graph: bool = False) -> list:
    """ONNX Runtime execution providers for an sdrt provider name, most preferred first (cuda_graph:
    the CUDA provider with `enable_cuda_graph`)."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        options = {**CUDA_OPTIONS, "enable_cuda_graph": "1"} if cuda_graph else CUDA_OPTIONS
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    if provider == "tensorrt":
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache_dir or Path("trt_cache")), "trt_timing_cache_enable": True}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    raise InputError(f"unknown ONNX Runtime provider {provider!r}; choose one of: {', '.join(ORT_PROVIDERS)}")


def ort_provider_name(provider: str) -> str:
    """The ONNX Runtime execution provider that serves an sdrt provider name."""
    first = ort_providers(provider)[0]
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


def check_ort_provider(provider: str) -> None:
    """Fail early, with the fix, when this onnxruntime cannot serve `provider`."""
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


def session(model: str | Path | bytes, provider: str = "cpu", *, component: str | None = None,
            shared_memory: bool = False, optimize: bool = True, config: dict | None = None,
            providers: list | None = None, cuda_graph: bool = False, initializers: dict | None = None):
    """An ONNX Runtime InferenceSession of MODEL (a path or serialized bytes) on an sdrt provider.

    shared_memory: allocate from the process's shared arena (sdrt.runtime.backends.memory; the
    runtime's engines). config: session config entries (e.g. where external weights live for a
    graph given as bytes). providers: ONNX Runtime's provider list, overriding PROVIDER's.
    cuda_graph: the CUDA provider with `enable_cuda_graph` (sdrt.runtime.backends.binding); such a
    session keeps its own arena, as a captured graph's buffers must stay where they were."""
    import onnxruntime as ort

    if provider != "cpu":
        preload_cuda_libraries(ort)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # not its notes on sdrt's overridable constants or node placement
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if shared_memory and not cuda_graph:
        MEMORY.configure(ort, opts, provider, component)
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (initializers or {}).values()]
    if values:  # add_initializer would not do: constant folding would still see the file's values
        opts.add_external_initializers(list(initializers), values)
    cache = Path(model).parent / "trt_cache" if isinstance(model, (str, Path)) else None
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, opts, providers=providers or ort_providers(provider, cache, cuda_graph))
    sess.sdrt_initializers = values  # ONNX Runtime reads them in place
    return sess


# components whose calls run as CUDA graphs on the CUDA provider: the UNet, called every step with
# the same shapes (the text encoder and VAE run once per image: a capture would cost more than it saves)
CUDA_GRAPH_COMPONENTS = ("unet",)
BINDING_DEVICE = "cuda"  # where the CUDA provider's IO-bound buffers live (tests stand the CPU in)


def cuda_graphs_wanted(component: str) -> bool:
    """SDRT_CUDA_GRAPHS=0 turns CUDA graphs off (on by default for CUDA_GRAPH_COMPONENTS)."""
    return component in CUDA_GRAPH_COMPONENTS and os.environ.get("SDRT_CUDA_GRAPHS", "1") != "0"


class OrtBackend(Backend):
    """ONNX Runtime InferenceSession on the CPU, CUDA or TensorRT execution provider. On CUDA, calls
    go through IO binding, and the UNet's through CUDA graphs where ONNX Runtime can capture them."""

    def _load(self) -> None:
        import onnxruntime as ort

        check_ort_provider(self.provider)
        self._outputs = [t.name for t in self.spec.outputs]
        self._run_options = ort.RunOptions()
        self._binder = None
        graphs = self.provider == "cuda" and cuda_graphs_wanted(self.spec.name)
        try:
            self._open_or_without_graphs(graphs)
        except SdrtError:
            raise
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise InputError(f"cannot load {self.path} (corrupt or not an ONNX model?): {e}") from None
        if self.provider == "cpu":
            MEMORY.release()

    def _open(self, graphs: bool) -> None:
        import onnxruntime as ort

        self.session = session(self.path, self.provider, component=self.spec.name, shared_memory=True,
                               cuda_graph=graphs, initializers=self.weights)
        wanted = ort_provider_name(self.provider)
        if self.session.get_providers()[0] != wanted:  # ONNX Runtime falls back when a provider's libraries
            # are missing, with a line on stdout: a GPU run silently on the CPU would be worse than an error
            raise SdrtError(f"provider {self.provider}: ONNX Runtime could not start {wanted} for {self.path} "
                            f"and fell back to {self.session.get_providers()[0]}; it needs "
                            f"{gpu_libraries(ort, wanted)}")
        if self.provider == "cuda":
            self._binder = IoBinder(self.session, self.spec, BINDING_DEVICE, 0, graphs)

    def _open_or_without_graphs(self, graphs: bool) -> None:
        try:
            self._open(graphs)
        except SdrtError:
            raise
        except Exception as e:
            if not graphs:
                raise
            self._no_graphs(e)

    def _no_graphs(self, why: Exception) -> None:
        """CUDA graph capture failed (at session creation or first run): go on without graphs."""
        log.warning("%s: no CUDA graphs (%s); running with IO binding only", self.spec.name, first_line(why)[:300])
        self.session = self._binder = None
        self._open(False)

    def _run(self, feeds):
        self._run_options.terminate = False
        if self._binder is None:
            return self.session.run(self._outputs, feeds, self._run_options)
        self._binder.resume()
        try:
            return self._binder.run(feeds)
        except Exception as e:
            if not self._binder.graphs or self._stop.is_set():
                raise
            self._no_graphs(e)
            return self._binder.run(feeds)

    def _terminate(self) -> None:
        self._run_options.terminate = True  # ONNX Runtime checks it between nodes
        if self._binder is not None:
            self._binder.terminate()

    def close(self) -> None:
        self.session = self._binder = None
