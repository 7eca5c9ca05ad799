"""Stand-ins for TensorRT 10 and cuda-python's runtime bindings, for machines without them.

They implement the calls sdrt makes, with TensorRT's and CUDA's documented signatures and return
conventions, on host memory: "device" buffers are ctypes buffers, an "engine" is the parsed ONNX
graph run by ONNX Runtime on the CPU, and stream capture records the engine's launches into a graph
that cudaGraphLaunch replays. So the tests can check sdrt's side of TensorRT (profiles, the engine
and timing caches, buffer reuse and growth, CUDA graph capture, replay and release, dtypes, the
manifest wiring) and refuse what TensorRT or CUDA would refuse (a profile for a name that is not a
network input, min > opt > max, a shape outside the profile, a copy inside a capture, a freed or
overrun buffer). They say nothing about TensorRT's own kernels or numerics.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from types import SimpleNamespace

import numpy as np

MAGIC = b"FAKEPLAN"


class Error(enum.Enum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


class Cuda:
    """cuda.bindings.runtime: every call returns a tuple (error, *values), as cuda-python's do."""

    cudaError_t = Error
    cudaMemcpyKind = enum.Enum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost")
    cudaStreamCaptureMode = enum.Enum("cudaStreamCaptureMode", "cudaStreamCaptureModeGlobal "
                                      "cudaStreamCaptureModeThreadLocal cudaStreamCaptureModeRelaxed")

    def __init__(self):
        self.memory: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.capturing: list | None = None
        self.capture_unsupported = False  # make the next capture fail, as an uncapturable engine would
        self.launches = self.instantiated = 0
        self._ids = 100

    def _id(self) -> int:
        self._ids += 1
        return self._ids

    def cudaGetDeviceProperties(self, device):
        return Error.cudaSuccess, SimpleNamespace(name=b"Fake GPU 80GB\x00\x00", major=9, minor=0)

    def cudaGetDeviceCount(self):
        return Error.cudaSuccess, 1

    def cudaStreamCreate(self):
        s = self._id()
        self.streams.add(s)
        return Error.cudaSuccess, s

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return (Error.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        assert stream in self.streams
        return (Error.cudaSuccess,)

    def cudaMalloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.memory[ctypes.addressof(buf)] = buf
        return Error.cudaSuccess, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        if self.memory.pop(ptr, None) is None:
            return (Error.cudaErrorInvalidValue,)
        return (Error.cudaSuccess,)

    def check(self, ptr: int, nbytes: int) -> None:
        """ptr..ptr+nbytes lies inside one live allocation."""
        assert ptr in self.memory and nbytes <= len(self.memory[ptr]), f"bad device range {ptr:#x}+{nbytes}"

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if self.capturing is not None:  # pageable host copies can't be captured
            return (Error.cudaErrorStreamCaptureUnsupported,)
        self.check(dst if kind.name.endswith("HostToDevice") else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (Error.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None and stream in self.streams
        self.capturing = []
        return (Error.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capturing = self.capturing, None
        if self.capture_unsupported:
            self.capture_unsupported = False
            return Error.cudaErrorStreamCaptureUnsupported, None
        g = self._id()
        self.graphs[g] = ops
        return Error.cudaSuccess, g

    def cudaGraphInstantiate(self, graph, flags):
        e = self._id()
        self.execs[e] = list(self.graphs[graph])
        self.instantiated += 1
        return Error.cudaSuccess, e

    def cudaGraphDestroy(self, graph):
        del self.graphs[graph]
        return (Error.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec):
        del self.execs[graph_exec]
        return (Error.cudaSuccess,)

    def cudaGraphLaunch(self, graph_exec, stream):
        for op in self.execs[graph_exec]:
            op()
        self.launches += 1
        return (Error.cudaSuccess,)

    def module(self) -> types.ModuleType:
        m = types.ModuleType("cuda.bindings.runtime")
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(m, name, getattr(self, name))
        return m


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT32 = np.int32
    INT64 = np.int64


ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64}


class TensorRt:
    """The part of the `tensorrt` module sdrt uses."""

    __version__ = "10.99.0-fake"
    DataType = DataType
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")

    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            self.level = level

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self.builds = 0
        tr = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags & (1 << 5), "sdrt builds strongly typed networks"
                return SimpleNamespace(model=None, inputs={})

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                tr.builds += 1
                (profile,) = config.profiles
                assert set(profile) == set(network.inputs), (sorted(profile), sorted(network.inputs))
                header = json.dumps({k: [list(s) for s in v] for k, v in profile.items()}).encode()
                return MAGIC + len(header).to_bytes(4, "little") + header + network.model.SerializeToString()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, []

            def parse_from_file(self, path):
                import onnx

                try:
                    model = onnx.load(path)  # with its external weights, as TensorRT's parser reads them
                except Exception as e:  # noqa: BLE001 - reported through get_error, as TensorRT does
                    self.errors.append(f"ModelImporter: {e}")
                    return False
                self.network.model = model
                init = {i.name for i in model.graph.initializer}
                self.network.inputs = {i.name: len(i.type.tensor_type.shape.dim)
                                       for i in model.graph.input if i.name not in init}
                return True

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan: bytes):
                if not plan.startswith(MAGIC):
                    return None
                n = int.from_bytes(plan[8:12], "little")
                profile = {k: [tuple(s) for s in v] for k, v in json.loads(plan[12:12 + n]).items()}
                return Engine(tr.cuda, profile, plan[12 + n:])

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype: DataType):
        return dtype.value

    def module(self) -> types.ModuleType:
        m = types.ModuleType("tensorrt")
        for name in ("__version__", "DataType", "NetworkDefinitionCreationFlag", "MemoryPoolType", "Logger",
                     "Builder", "OnnxParser", "Runtime", "nptype"):
            setattr(m, name, getattr(self, name))
        return m


class OptimizationProfile(dict):
    def set_shape(self, name, lo, opt, hi):
        assert len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (name, lo, opt, hi)
        self[name] = (tuple(lo), tuple(opt), tuple(hi))


class BuilderConfig:
    def __init__(self):
        self.profiles, self.pools, self.timing = [], {}, None

    def set_memory_pool_limit(self, pool, nbytes):
        self.pools[pool] = nbytes

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return SimpleNamespace(entries=data.count(b";"), serialize=None)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache
        return True

    def get_timing_cache(self):
        n = self.timing.entries + 1  # every build adds its tactics
        return SimpleNamespace(serialize=lambda: b"timing;" * n)


class Engine:
    def __init__(self, cuda: Cuda, profile: dict, model_bytes: bytes):
        import onnx
        import onnxruntime as ort

        self.cuda, self.profile = cuda, profile
        model = onnx.load_from_string(model_bytes)
        self.dtypes = {v.name: ONNX_TYPES[v.type.tensor_type.elem_type]
                       for v in (*model.graph.input, *model.graph.output)}
        self.inputs = [i.name for i in model.graph.input if i.name in profile]
        self.outputs = [o.name for o in model.graph.output]
        self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        self._out_shapes: dict = {}

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        return Context(self)

    def output_shapes(self, in_shapes: dict) -> dict:
        key = tuple(sorted(in_shapes.items()))
        if key not in self._out_shapes:  # what TensorRT infers at build time; here: one run on zeros
            feeds = {n: np.zeros(s, self.dtypes[n].value) for n, s in in_shapes.items()}
            self._out_shapes[key] = dict(zip(self.outputs, (o.shape for o in self.session.run(None, feeds))))
        return self._out_shapes[key]


class Context:
    def __init__(self, engine: Engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.runs = 0

    def set_input_shape(self, name, shape) -> bool:
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shapes(self.shapes)[name]

    def execute_async_v3(self, stream) -> bool:
        e, cuda = self.engine, self.engine.cuda
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what a launch binds

        def view(name, shape):
            dtype = np.dtype(e.dtypes[name].value)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            cuda.check(addresses[name], nbytes)
            return np.frombuffer((ctypes.c_char * nbytes).from_address(addresses[name]), dtype).reshape(shape)

        def launch():
            self.runs += 1
            outs = e.session.run(None, {n: view(n, shapes[n]).copy() for n in e.inputs})
            for name, out in zip(e.outputs, outs):
                np.copyto(view(name, out.shape), out)

        if cuda.capturing is not None:
            cuda.capturing.append(launch)
        else:
            launch()
        return True


def install(monkeypatch) -> tuple[TensorRt, Cuda]:
    """Make `import tensorrt` and `from cuda.bindings import runtime` give the stand-ins."""
    cuda = Cuda()
    trt = TensorRt(cuda)
    runtime = cuda.module()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    package = types.ModuleType("cuda")
    package.bindings = bindings
    for name, mod in (("tensorrt", trt.module()), ("cuda", package), ("cuda.bindings", bindings),
                      ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt, cuda


# -- a stand-in TensorRT over the real CUDA runtime, for the GPU test of sdrt's CUDA calls ------------

class DeviceEngine:
    """An "engine" computing y = 2 * x + t[:, None] in x's dtype, on the device buffers sdrt binds,
    launched with CuPy on the stream sdrt passes: so it is captured into sdrt's CUDA graphs and replayed
    by them. `executes` counts the launches TensorRT itself would make (replays make none)."""

    def __init__(self, dtype: DataType, batch: tuple[int, int], length: tuple[int, int]):
        import cupy

        self.cupy, self.dtypes = cupy, {"x": dtype, "t": DataType.FLOAT, "y": dtype}
        self.profile = {"x": (batch, length), "t": (batch,)}
        self.kernel = cupy.ElementwiseKernel("T x, float32 t", "T y", "y = (T)(2.0f * (float)x + t)",
                                             "sdrt_fake_engine")
        self.kernel(cupy.ones(4, dtype.value), cupy.ones(4, np.float32))  # compiled and loaded before any capture
        self.executes = 0

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        engine = self

        class DeviceContext:
            def __init__(self):
                self.shapes, self.addresses = {}, {}

            def set_input_shape(self, name, shape) -> bool:
                ok = len(shape) == len(engine.profile[name]) and all(
                    lo <= s <= hi for s, (lo, hi) in zip(shape, engine.profile[name]))
                if ok:
                    self.shapes[name] = tuple(shape)
                return ok

            def set_tensor_address(self, name, ptr) -> bool:
                self.addresses[name] = int(ptr)
                return True

            def get_tensor_shape(self, name):
                return self.shapes["x"]  # y: x's shape

            def execute_async_v3(self, stream) -> bool:
                cp = engine.cupy

                def view(name, shape):
                    dtype = np.dtype(engine.dtypes[name].value)
                    mem = cp.cuda.UnownedMemory(self.addresses[name], int(np.prod(shape)) * dtype.itemsize, None)
                    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, 0))

                x = view("x", self.shapes["x"])
                with cp.cuda.ExternalStream(int(stream)):
                    engine.kernel(x, view("t", self.shapes["t"])[:, None], view("y", x.shape))
                engine.executes += 1
                return True

        return DeviceContext()


def install_on_real_cuda(monkeypatch, engine: DeviceEngine) -> None:
    """`import tensorrt` gives a module whose runtime deserializes any plan into `engine`;
    cuda.bindings stays the real one."""
    m = types.ModuleType("tensorrt")
    m.__version__ = "10.99.0-fake"
    m.DataType = DataType
    m.Logger = TensorRt.Logger
    m.nptype = TensorRt.nptype
    m.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    monkeypatch.setitem(sys.modules, "tensorrt", m)
