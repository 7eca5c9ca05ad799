"""The memory policy of ONNX Runtime sessions in one object: shared arenas, and handing memory back.

A pipeline runs one component at a time, so all sessions of the process allocate from one shared
arena per device and the pipeline's peak is the largest component's working set, not the sum of
four arenas each sized to its own peak. Between phases (text, init image, sampling, decoding) the
pipeline calls `release()`: ONNX Runtime shrinks an arena only at the end of a run that asks for
it, so a one-node no-op model runs on a session sharing that arena with the shrink option set; then
glibc's malloc_trim hands back what the C allocator holds freed. Shrinking after every UNet call
instead re-faults its working set each step. The measurements behind each choice are in
docs/kernels.md ("Memory").
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import numpy as np

from sdrt.errors import InputError

log = logging.getLogger(__name__)

# ONNX Runtime's CUDA provider options (docs/gpu.md: the largest cuDNN workspace and the power-of-two
# arena cost GPU memory for no speed on an H100)
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "0",
                "arena_extend_strategy": "kSameAsRequested"}
# SDRT_GPU_MEMORY=low (default): one shared CUDA arena shrunk between phases; "fast": each session
# keeps its own arena at its high-water mark (less time per image, more GPU memory: docs/gpu.md)
GPU_MEMORY_MODES = ("low", "fast")
# ONNX Runtime's memory pattern pre-plans one block for a whole run; without it the UNet session's
# peak is lower at the same speed, while the VAE decoder's is higher (docs/kernels.md, "Memory")
NO_MEMORY_PATTERN = {"unet"}
# A one-node ONNX model (Identity on a float [1], IR 7, opset 13; tests rebuild it with onnx.helper).
NOOP_MODEL = bytes.fromhex(
    "080712003a3d0a100a017812017922084964656e74697479120772656c656173655a0f0a0178120a0a08080112040a0208"
    "01620f0a0179120a0a08080112040a02080142040a00100d")


def gpu_memory_mode() -> str:
    mode = os.environ.get("SDRT_GPU_MEMORY", "low")
    if mode not in GPU_MEMORY_MODES:
        raise InputError(f"SDRT_GPU_MEMORY={mode!r}: choose one of {', '.join(GPU_MEMORY_MODES)}")
    return mode


class MemoryPolicy:
    """Which shared arenas exist, and the sessions that shrink them. One per process (MEMORY)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.shared = set()  # devices ("cpu", "gpu") whose shared arena is registered
        self._release = {}  # device -> (no-op session, run options that shrink that arena)
        self._malloc_trim = None

    def configure(self, ort, opts, provider: str, component: str | None = None) -> None:
        """Set up session options OPTS for a session of PROVIDER under this policy."""
        if provider == "cpu":
            self._share(ort, opts, "cpu")
            opts.enable_mem_pattern = component not in NO_MEMORY_PATTERN
        elif provider == "cuda" and gpu_memory_mode() == "low":
            self._share(ort, opts, "gpu")

    def _share(self, ort, opts, device: str) -> None:
        with self._lock:
            if device not in self.shared and not self._register(ort, device):
                return
            self.shared.add(device)
        opts.add_session_config_entry("session.use_env_allocators", "1")

    @staticmethod
    def _register(ort, device: str) -> bool:
        """The CPU arena grows in power-of-two regions (ONNX Runtime's default): fewer, larger regions
        let freed neighbours merge. The CUDA arena grows by exactly what is asked."""
        if device == "cpu":
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
            return True
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, CUDA_OPTIONS,
                                                 ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        except Exception as e:  # the CUDA provider's libraries did not load: creating the session says so
            log.debug("no shared CUDA arena: %s", e)
            return False
        return True

    def _shrink(self, device: str) -> None:
        if device not in self._release:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._share(ort, opts, device)
            providers = ["CPUExecutionProvider"] if device == "cpu" else [("CUDAExecutionProvider", CUDA_OPTIONS)]
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"{device}:0")
            self._release[device] = (ort.InferenceSession(NOOP_MODEL, opts, providers=providers), run_options)
        session, run_options = self._release[device]
        session.run(None, {"x": np.zeros(1, np.float32)}, run_options)

    def release(self) -> None:
        """Hand back the shared arenas' free regions, then what the C allocator holds freed."""
        for device in sorted(self.shared):
            self._shrink(device)
        if self._malloc_trim is None:
            try:
                self._malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):
                self._malloc_trim = False
        if self._malloc_trim:
            self._malloc_trim(0)


MEMORY = MemoryPolicy()


def release_free_memory() -> None:
    MEMORY.release()
