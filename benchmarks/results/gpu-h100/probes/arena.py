import json, os, sys, threading, time
import numpy as np, onnxruntime as ort
from sdrt.manifest import Manifest
from sdrt.runtime.backends import preload_cuda_libraries, CUDA_OPTIONS
import pynvml
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0); peak = [0]; stop = [False]
def poll():
    while not stop[0]:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid(): peak[0] = max(peak[0], p.usedGpuMemory >> 20)
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
E = "/tmp/eng/sd15-fp16"; m = Manifest.read(E); shared = sys.argv[1] in ("shared", "shrink")
ro = ort.RunOptions()
if sys.argv[1] in ("shrink", "ownshrink"): ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
preload_cuda_libraries(ort)
if shared:
    info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, CUDA_OPTIONS, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
S = {}
for name in ("text_encoder", "unet", "vae_decoder"):
    o = ort.SessionOptions(); o.log_severity_level = 3
    if shared: o.add_session_config_entry("session.use_env_allocators", "1")
    S[name] = ort.InferenceSession(f"{E}/{m.components[name].file_for(('onnxruntime',))}", o, providers=[("CUDAExecutionProvider", CUDA_OPTIONS)])
dims = {"text_encoder": {"B": 2, "S": 77}, "unet": {"B": 2, "h": 64, "w": 64, "S": 77}, "vae_decoder": {"B": 1, "h": 64, "w": 64}}
t = {}
for name in ("text_encoder", "unet", "unet", "unet", "vae_decoder", "unet", "vae_decoder"):
    feeds = m.components[name].spec.sample_inputs(dims[name], seed=0)
    t0 = time.perf_counter(); S[name].run(None, feeds, ro); t[name] = round(1000 * (time.perf_counter() - t0), 1)
time.sleep(0.1); stop[0] = True
print(json.dumps({"mode": sys.argv[1], "peak_gpu_mb": peak[0], "last_ms": t}))
