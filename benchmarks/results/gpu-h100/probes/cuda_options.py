import json, os, sys, time
import numpy as np, onnxruntime as ort
from sdrt.manifest import Manifest
from sdrt.runtime.backends import preload_cuda_libraries
E = "/tmp/eng/sd15-fp16"; m = Manifest.read(E)
cfg = json.loads(sys.argv[1]); comp = sys.argv[2]
preload_cuda_libraries(ort)
c = m.components[comp]; f = f"{E}/{c.file_for(('onnxruntime',))}"
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(f, o, providers=[("CUDAExecutionProvider", cfg)])
dims = {"unet": {"B": 2, "h": 64, "w": 64, "S": 77}, "vae_decoder": {"B": 1, "h": 64, "w": 64}}[comp]
feeds = c.spec.sample_inputs(dims, seed=0)
for _ in range(3): s.run(None, feeds)
t = []
for _ in range(15):
    t0 = time.perf_counter(); s.run(None, feeds); t.append(time.perf_counter() - t0)
import pynvml; pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
mem = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid()]
print(json.dumps({"comp": comp, "cfg": cfg, "median_ms": round(1000 * float(np.median(t)), 2), "gpu_mb": (mem[0] >> 20) if mem else None}))
