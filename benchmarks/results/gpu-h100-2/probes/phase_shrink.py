"""One fresh process per mode: a cold-start Pipeline on ONNX Runtime's CUDA provider, three (or ARGV[3]) 20-step
512 px generations; the process's GPU memory polled every 5 ms through NVML.
own = each session its own CUDA arena (sdrt before); phase = one shared arena that the pipeline
shrinks between phases (text, sampling, decoding). Usage: phase_shrink.py ENGINES own|phase"""
import json, os, sys, threading, time

import pynvml

import sdrt

pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
peak, stop = [0, 0], [False]  # [whole process, since the last reset]


def poll():
    while not stop[0]:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid() and p.usedGpuMemory:
                mb = p.usedGpuMemory >> 20
                peak[0], peak[1] = max(peak[0], mb), max(peak[1], mb)
        time.sleep(0.005)


threading.Thread(target=poll, daemon=True).start()
engines, mode = sys.argv[1], sys.argv[2]
os.environ["SDRT_GPU_MEMORY"] = "low" if mode == "phase" else "fast"
t0 = time.perf_counter()
pipe = sdrt.Pipeline.load(engines, provider="cuda")
load_s = time.perf_counter() - t0
runs = []
for seed in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
    peak[1] = 0
    t0 = time.perf_counter()
    pipe("a photo of an astronaut riding a horse", steps=20, seed=seed, width=512, height=512)
    runs.append({"s": round(time.perf_counter() - t0, 3), "peak_mb": peak[1]})
time.sleep(0.1)
stop[0] = True
print(json.dumps({"mode": mode, "load_s": round(load_s, 2), "peak_gpu_mb": peak[0], "runs": runs}))
