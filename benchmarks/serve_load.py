"""`sdrt serve` under load, measured in one run on this machine: throughput and latency at 1, 4 and 16
concurrent clients with batching against one request at a time, and (with --robustness) 64 / 256
clients with /health probed throughout, RSS over 1,000+ requests, and 50 slowloris connections.

    python benchmarks/serve_load.py ENGINE_DIR --out benchmarks/results/serve-load-tiny --steps 2 --mixed
    python benchmarks/serve_load.py ENGINE_DIR --out ... --steps 4 --size 256 --requests 3 --no-robustness

Each server runs in its own process; the load generator (benchmarks/load.py) runs at nice 19, as if its
clients were on other machines (here they share the cores), and /health is probed from this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import load  # noqa: E402 - benchmarks/load.py


class Server:
    def __init__(self, engines: str, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--engines", engines, "--port", "0",
                                      "-q", *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.proc.stdout.readline())
        if not found:
            raise SystemExit("sdrt serve did not start")
        self.url = found.group(1)
        while _get(self.url + "/ready") != 200:
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(120)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except OSError as e:
        return getattr(e, "code", 0)


MODES = (("one_at_a_time", ("--max-batch", "1", "--max-images", "1")),
         ("batched", ("--max-batch", "8")),  # queue batching: waiting requests with one batch_key
         ("continuous", ("--max-batch", "8", "--batching", "continuous")))


def run_load(url: str, body: str | list[str], clients: int, requests: int, *extra: str) -> dict:
    bodies = [a for b in ([body] if isinstance(body, str) else body) for a in ("--body", b)]
    out = subprocess.run(["nice", "-n", "19", sys.executable, str(HERE / "load.py"), url, "--clients", str(clients),
                          "--requests", str(requests), *bodies, *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def throughput(engines: str, body: str | list[str], requests_per_client: int) -> list[dict]:
    rows = []
    for clients in (1, 4, 16):
        row = {"clients": clients}
        for mode, flags in MODES:
            server = Server(engines, "--max-queue", "64", *flags)
            try:
                run_load(server.url, body, 1, 2)  # warm
                row[mode] = run_load(server.url, body, clients, clients * requests_per_client)
            finally:
                server.stop()
        row["throughput_ratio"] = ratio(row)
        if "continuous" in row:
            row["continuous_ratio"] = ratio(row, "continuous")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ratio(row: dict, mode: str = "batched") -> float:
    """Images per second in MODE over one at a time (from the counts, not the rounded rates)."""
    def rate(r):
        return r["statuses"].get("200", 0) / r["seconds"]
    return round(rate(row[mode]) / rate(row["one_at_a_time"]), 2)


def robustness(engines: str, body: str) -> dict:
    server = Server(engines, "--max-queue", "16")
    try:
        run_load(server.url, body, 4, 100)  # warm
        rss0 = load.rss_mb(server.proc.pid)
        host, port = server.url.rsplit("//", 1)[1].split(":")
        probe = load.HealthProbe(host, int(port))  # in this process, un-niced
        probe.start()
        runs = {f"{c}_clients": run_load(server.url, body, c, n) for c, n in ((64, 300), (256, 600), (16, 600))}
        probe.stop.set()
        probe.join()
        rss1 = load.rss_mb(server.proc.pid)
        out = {"runs": runs, "requests": sum(r["requests"] for r in runs.values()),
               "health": {"probes": len(probe.times), "failures": probe.failures,
                          "worst_ms": round(1000 * max(probe.times), 1),
                          "p99_ms": round(1000 * load.percentile(probe.times, 99), 1)},
               "rss_mb": {"after_warmup": round(rss0, 1), "after_load": round(rss1, 1),
                          "change_pct": round(100 * (rss1 - rss0) / rss0, 1)},
               "slowloris": slowloris(server.url, body)}
    finally:
        server.stop()
    return out


def slowloris(url: str, body: str) -> dict:
    host, port = url.rsplit("//", 1)[1].split(":")

    def one() -> float:
        t0 = time.perf_counter()
        req = urllib.request.Request(url + "/generate", body.encode(), {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        return time.perf_counter() - t0

    baseline = min(one() for _ in range(3))
    loris = load.Slowloris(host, int(port), 50)
    loris.start()
    time.sleep(2)
    during = max(one() for _ in range(3))
    held = loris.open
    loris.stop.set()
    return {"connections_held": held, "baseline_s": round(baseline, 3), "with_50_slowloris_s": round(during, 3)}


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def _row(r: dict, cell) -> str:
    cont = f"{cell(r['continuous'])} | {r['continuous_ratio']}x" if "continuous" in r else "- | -"
    return f"| {r['clients']} | {cell(r['one_at_a_time'])} | {cell(r['batched'])} | {r['throughput_ratio']}x | {cont} |"


def markdown(results: dict) -> str:
    lines = [f"# sdrt serve under load: {results['engines']}", "", f"Machine: {results['machine']}. "
             f"Request: `{results['body']}`. Load generator at nice 19; one server process per row and mode.", "",
             "| clients | one at a time: images/s, p50, p95 | queue batching | ratio | continuous batching | ratio |",
             "|---|---|---|---|---|---|"]

    def cell(r):
        lat = r["latency_s"]
        return f"{r['ok_per_second']:.3g}, {lat['p50']:.3g} s, {lat['p95']:.3g} s"

    for r in results["throughput"]:
        lines.append(_row(r, cell))
    if "throughput_mixed" in results:
        lines += ["", "Mixed requests, in turn: " + ", ".join(f"`{b}`" for b in results["mixed_bodies"]), "",
                  lines[4], lines[5], *(_row(r, cell) for r in results["throughput_mixed"])]
    rob = results.get("robustness")
    if rob:
        lines += ["", "| run | requests | statuses | p50 | p99 |", "|---|---|---|---|---|"]
        for name, r in rob["runs"].items():
            lines.append(f"| {name.replace('_', ' ')} | {r['requests']} | {r['statuses']} "
                         f"| {r['latency_s']['p50']:.3g} s | {r['latency_s']['p99']:.3g} s |")
        h, m, s = rob["health"], rob["rss_mb"], rob["slowloris"]
        lines += ["", f"- /health, probed every 50 ms throughout ({h['probes']} probes): worst {h['worst_ms']} ms, "
                      f"p99 {h['p99_ms']} ms, {h['failures']} failures.",
                  f"- RSS over {rob['requests']} requests: {m['after_warmup']} MB after warm-up, {m['after_load']} MB "
                  f"after ({m['change_pct']:+}%).",
                  f"- 50 slowloris connections held ({s['connections_held']} open): a normal request took "
                  f"{s['with_50_slowloris_s']} s at worst, against {s['baseline_s']} s without them."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, help="width and height (default: the model's)")
    p.add_argument("--requests", type=int, default=25, help="per client, in the throughput table")
    p.add_argument("--no-robustness", action="store_true")
    p.add_argument("--mixed", action="store_true", help="also a table for a mix of step counts and samplers")
    args = p.parse_args()
    body = {"prompt": "a lighthouse on a cliff", "steps": args.steps}
    if args.size:
        body |= {"width": args.size, "height": args.size}
    body = json.dumps(body)
    results = {"engines": args.engines, "body": body, "machine": machine(),
               "throughput": throughput(args.engines, body, args.requests)}
    if args.mixed:  # the same prompt at other step counts and samplers: queue batching can't merge these
        mixed = [json.dumps(json.loads(body) | {"steps": args.steps + k, "sampler": smp})
                 for k, smp in enumerate(("dpmpp_2m_karras", "euler_a", "ddim", "heun"))]
        results["mixed_bodies"] = mixed
        results["throughput_mixed"] = throughput(args.engines, mixed, args.requests)
    if not args.no_robustness:
        results["robustness"] = robustness(args.engines, body)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
