"""The `sdrt` command. Errors: one line on stderr; exit 2 for bad input, 1 for failures."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from sdrt.errors import InputError, SdrtError

log = logging.getLogger("sdrt")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage as well)
        raise InputError(f"{message} (see `{self.prog} --help`)")


def cmd_export(args) -> int:
    from sdrt.export import export

    profile = None
    if args.backend == "tensorrt":
        from sdrt.export.tensorrt import Profile

        for flag, v in (("--trt-batch", args.trt_batch), ("--trt-sizes", args.trt_sizes)):
            if not (0 < v[0] <= v[1] <= v[2]):
                raise InputError(f"{flag} {' '.join(map(str, v))}: need 0 < MIN <= OPT <= MAX")
        profile = Profile(tuple(args.trt_batch), tuple(args.trt_sizes))
    manifest = export(args.source, args.out_dir, backend=args.backend, precision=args.precision,
                      opset=args.opset, force=args.force, progress=not args.quiet, optimize=not args.no_optimize,
                      trt_profile=profile, cpu_size=args.cpu_size, config=args.config,
                      prediction_type=args.prediction_type, loras=args.lora)
    parity = max(c.parity_max_abs for c in manifest.components.values())
    print(f"wrote {args.out_dir} ({', '.join(manifest.components)}; max parity error {parity:.2g})")
    return 0


def _output_paths(out: str, seeds: list[int]) -> list[Path]:
    path = Path(out)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(seeds))]


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from sdrt.runtime.pipeline import Pipeline

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"-o {args.output}: the output must be a .png file")
    if not out.parent.exists():
        raise InputError(f"-o {args.output}: directory {out.parent} does not exist")
    pipe = Pipeline.load(args.engines, provider=args.provider)
    bars = []

    def progress(step, total, latents):  # the bar starts with the first step, after validation
        if not bars:
            bars.append(tqdm(total=total, unit="step", desc="generate", disable=args.quiet, file=sys.stderr))
        bars[0].update(1)

    t0 = time.perf_counter()
    with pipe:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                      sampler=args.sampler, guidance_scale=args.guidance_scale, seed=args.seed,
                      width=args.width, height=args.height, num_images=args.batch, clip_skip=args.clip_skip,
                      image=args.init_image, strength=args.strength, mask=args.mask, callback=progress,
                      schedule_type=args.schedule_type, eta=args.eta)
    for bar in bars:
        bar.close()
    from sdrt.runtime.images import save_png

    for image, text, path in zip(result.images, result.parameters, _output_paths(args.output, result.seeds)):
        save_png(image, path, text)
        print(path)
    log.info("%d image(s) in %.1f s (seed %d)", len(result.images), time.perf_counter() - t0, result.seeds[0])
    return 0


def _bench_engines(args, stack: contextlib.ExitStack) -> Path:
    """The engine dir to measure: ENGINE_DIR itself, or, when it names a model source instead (tiny,
    random-sd15, a diffusers folder, a hub id), a temporary export of it (removed afterwards)."""
    from sdrt.manifest import MANIFEST

    given = Path(args.engine_dir)
    if (given / MANIFEST).is_file():
        return given
    try:
        from sdrt.export import export, sources
    except ImportError:  # the runtime-only install: only engine dirs
        return given
    if not sources.is_source(args.engine_dir):
        return given  # Manifest.read says what is wrong with it
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdrt-bench-")))
    log.info("%s is a model source, not an engine dir: exporting it to %s first", args.engine_dir, tmp)
    export(args.engine_dir, tmp / "engines", progress=not args.quiet)
    return tmp / "engines"


def cmd_bench(args) -> int:
    from tqdm.auto import tqdm

    from sdrt import bench
    from sdrt.bench import report
    from sdrt.manifest import Manifest

    settings = bench.Settings(sizes=args.sizes or [], repeats=args.repeats, warmup=args.warmup, steps=args.steps,
                              batches=args.batches, sampler=args.sampler, providers=args.providers,
                              plain=args.plain, also=args.also,
                              eager=not args.no_eager, peer=not args.no_peer,
                              cold=not args.no_cold, end_to_end=not args.no_end_to_end)
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or min(args.batches) < 1:
        raise InputError("--repeats, --steps and --batches must be >= 1, --warmup >= 0")
    from sdrt.runtime.samplers import get_sampler

    get_sampler(args.sampler)
    with contextlib.ExitStack() as stack:
        engine_dir = _bench_engines(args, stack)
        manifest = Manifest.read(engine_dir)
        with tqdm(total=bench.total_rounds(manifest, settings), unit="call", desc="bench",
                  disable=args.quiet, file=sys.stderr) as bar:
            results = bench.run(engine_dir, settings, progress=lambda: bar.update(1),
                                checkpoint=lambda r: report.write_partial(r, Path(args.out)))
    files = report.write(results, Path(args.out), command=" ".join(["sdrt", *map(shlex.quote, args.argv)]))
    print(report.markdown(results))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_serve(args) -> int:
    from sdrt.serve import Server, make_http_server

    server = Server(args.engines, provider=args.provider, max_images=args.max_images)
    httpd = make_http_server(server, args.host, args.port)

    def stop(signum, frame):  # SIGTERM (docker stop, systemd) ends it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if not args.no_warmup:
            log.info("creating the sessions")
            server.warmup()
        host, port = httpd.server_address[:2]
        print(f"sdrt serve: {args.engines} ({server.pipe.manifest.pipeline}, provider {args.provider}) on "
              f"http://{host}:{port}  (POST /generate, GET /info, GET /health; Ctrl-C stops)", flush=True)
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("sdrt serve: stopped", file=sys.stderr)
    finally:
        httpd.server_close()
        server.close()
    return 0


def cmd_info(args) -> int:
    from sdrt.manifest import Manifest

    m = Manifest.read(args.engine_dir)
    if args.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    d = Path(args.engine_dir)
    src = m.source
    print(f"engine dir     {d}")
    print(f"source         {src.get('name')} ({src.get('kind')}), sha256 {src.get('sha256', '')[:16]}")
    for lora in src.get("loras", []):
        print(f"LoRA fused     {lora['file']} at {lora['scale']:g}, sha256 {lora['sha256'][:16]}")
    print(f"pipeline       {m.pipeline}, prediction {m.prediction_type}, "
          f"scheduler {m.scheduler_config.get('_class_name', '?')} "
          f"({m.scheduler_config.get('timestep_spacing', 'leading')} spacing)")
    print(f"latents        {m.dims.latent_channels} channels, VAE scale factor {m.dims.vae_scale_factor}, "
          f"scaling {m.vae_scaling_factor}, default size {m.default_image_size} px")
    print("exported with  " + ", ".join(f"{k} {v}" for k, v in m.exporter.items()))
    for name, c in m.components.items():
        size = sum((d / f).stat().st_size for f in c.files) / 2**20
        parity = "n/a" if c.parity_max_abs is None else f"{c.parity_max_abs:.2g} (tol {c.parity_tolerance:.2g})"
        print(f"\n{name}: {c.backend} {c.precision}, {size:,.1f} MiB, parity max abs error {parity}")
        print(f"  optimizations: {', '.join(c.optimizations) or 'none'}")
        for target, g in c.targets.items():
            fused = ", ".join(f"{k} x{v}" for k, v in g.fused.items()) or "nothing"
            err = "n/a" if g.parity_max_abs is None else f"{g.parity_max_abs:.2g}"
            print(f"  {target} graph: {g.file} ({fused}; parity max abs error {err})")
        for kind, tensors in (("in ", c.spec.inputs), ("out", c.spec.outputs)):
            for t in tensors:
                print(f"  {kind} {t.name:<22} {t.dtype:<8} [{', '.join(str(x) for x in t.shape)}]")
        dims = ", ".join(f"{k} {lo}..{hi} (opt {opt})" for k, (lo, opt, hi) in c.spec.dims.items())
        print(f"  dims: {dims}")
    return 0


def cmd_samplers(args) -> int:
    from sdrt.runtime.samplers import SAMPLERS

    print(f"{'name':<20} {'A1111 name':<20} {'kind':<14} {'schedule types':<33} diffusers scheduler")
    for s in SAMPLERS.values():
        kind = "deterministic" if s.deterministic else "stochastic"
        if s.name == "ddim":
            kind += "*"
        cls, overrides = s.diffusers
        extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"{s.name:<20} {s.display:<20} {kind:<14} {', '.join(s.schedule_types) or '-':<33} "
              f"{cls}" + (f" ({extra})" if extra else ""))
    print("\n* ddim is stochastic with --eta > 0. A schedule type is chosen with --schedule-type.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__
    from sdrt.runtime.backends import PROVIDERS
    from sdrt.runtime.samplers import DEFAULT_SAMPLER, SCHEDULE_TYPES

    p = _Parser(prog="sdrt", description="Stable Diffusion on ONNX Runtime / TensorRT engines, no torch.")
    p.add_argument("--version", action="version", version=f"sdrt {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    quiet = _Parser(add_help=False)  # -q works after the subcommand too
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or info logs")
    e = sub.add_parser("export", parents=[quiet], help="checkpoint -> engine dir (ONNX + manifest.json)")
    e.add_argument("source", help="diffusers folder, .safetensors / .ckpt file, hub id, 'tiny' or 'random-sd15'")
    e.add_argument("out_dir")
    e.add_argument("--backend", default="onnx", choices=["onnx", "tensorrt"])
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23)")
    e.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    e.add_argument("--trt-batch", type=int, nargs=3, default=[1, 1, 4], metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT profile: images per call (default 1 1 4)")
    e.add_argument("--trt-sizes", type=int, nargs=3, default=[256, 512, 1024], metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT profile: image side in pixels (default 256 512 1024)")
    e.add_argument("--config", default=None, metavar="DIR",
                   help="single-file sources: a diffusers folder with the model's configs (default: SD 1.x "
                        "or 2.x, detected from the file)")
    e.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override the source's (SD 2.x single files: v_prediction unless given; 512-base "
                        "models are epsilon)")
    e.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (diffusers or kohya / A1111 .safetensors) into the UNet and text encoder "
                        "at SCALE (default 1); repeat for several")
    e.add_argument("--no-optimize", action="store_true",
                   help="write only the standard ONNX graphs, no per-target rewrites (sdrt.kernels)")
    e.add_argument("--cpu-size", type=int, default=None, metavar="PX",
                   help="image side the CPU graph's Winograd convolutions are chosen for: layers whose "
                        "latent map is at least 32x32 at this size (default 512 px for SD; e.g. 256 "
                        "if you generate small images)")
    e.set_defaults(fn=cmd_export)

    g = sub.add_parser("generate", parents=[quiet], help="prompt -> PNG (A1111 'parameters' metadata included)")
    g.add_argument("prompt")
    g.add_argument("--engines", required=True, help="engine dir written by `sdrt export`")
    g.add_argument("-o", "--output", default="sdrt.png", help="PNG path; with --batch N: NAME-0.png ...")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default=DEFAULT_SAMPLER, help="see `sdrt samplers`; A1111 names work too")
    g.add_argument("--schedule-type", default=None, choices=list(SCHEDULE_TYPES),
                   help="A1111 schedule type for the samplers that take one (see `sdrt samplers`)")
    g.add_argument("--eta", type=float, default=None, help="ddim only: noise amount in [0, 1] (default 0)")
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: random)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--batch", type=int, default=1, help="number of images")
    g.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer, 2 = penultimate (A1111)")
    g.add_argument("--init-image", default=None, help="img2img: start from this image")
    g.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image")
    g.add_argument("--mask", default=None, help="inpainting mask image (white: repaint, black: keep; "
                   "needs an inpainting model's engines and --init-image)")
    g.add_argument("--provider", default="cpu", choices=list(PROVIDERS),
                   help="cpu (ONNX Runtime), cuda / tensorrt (ONNX Runtime GPU), openvino (bf16 on CPUs "
                        "with bf16 units), openvino-fp32")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", parents=[quiet], help="sdrt engines vs eager PyTorch, side by side")
    b.add_argument("engine_dir", help="an engine dir, or a model source to export first into a temporary one "
                   "(tiny, random-sd15, a diffusers folder, a hub id)")
    b.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in px (default: the model's)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds per workload")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    b.add_argument("--steps", type=int, default=10, help="steps of the end-to-end generations")
    b.add_argument("--batches", type=int, nargs="+", default=[1], help="end-to-end batch sizes")
    b.add_argument("--sampler", default=DEFAULT_SAMPLER)
    b.add_argument("--providers", nargs="+", default=["cpu"], choices=list(PROVIDERS),
                   help="one sdrt path per runtime provider (e.g. cpu openvino)")
    b.add_argument("--plain", action="store_true",
                   help="also the standard graphs without sdrt.kernels rewrites (first provider)")
    b.add_argument("--also", nargs="+", default=[], metavar="ENGINE_DIR",
                   help="more engine dirs of the same model (e.g. an int8 export), on every provider")
    b.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch baseline")
    b.add_argument("--no-peer", action="store_true",
                   help="skip diffusers' OnnxStableDiffusionPipeline on the standard graphs (the peer ONNX path)")
    b.add_argument("--no-cold", action="store_true", help="skip the cold-start subprocesses")
    b.add_argument("--no-end-to-end", action="store_true", help="components only")
    b.add_argument("--out", default="bench-results", help="directory for results.json/.md/.png")
    b.set_defaults(fn=cmd_bench)

    v = sub.add_parser("serve", parents=[quiet], help="an engine dir behind an HTTP/JSON API (POST /generate)")
    v.add_argument("--engines", required=True, help="engine dir from `sdrt export`")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--provider", default="cpu", choices=list(PROVIDERS))
    v.add_argument("--max-images", type=int, default=4, help="most images one request may ask for")
    v.add_argument("--no-warmup", action="store_true", help="create the sessions on the first request")
    v.set_defaults(fn=cmd_serve)

    i = sub.add_parser("info", help="describe an engine dir")
    i.add_argument("engine_dir")
    i.add_argument("--json", action="store_true", help="print manifest.json")
    i.set_defaults(fn=cmd_info)

    s = sub.add_parser("samplers", help="list sampler names")
    s.set_defaults(fn=cmd_samplers)
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdrt").setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _one_line(error: Exception) -> str:
    """Library messages may quote multi-line text from onnxruntime or the hub; the CLI prints one line."""
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser().parse_args(argv)
        args.argv = argv  # as typed, for reports that say how to reproduce them
        _setup_logging(args.quiet)
        return args.fn(args)
    except SdrtError as e:
        print(f"sdrt: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `sdrt samplers | head`: stop quietly (Python docs' SIGPIPE advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line unless SDRT_DEBUG asks for the traceback
        if os.environ.get("SDRT_DEBUG"):
            raise
        print(f"sdrt: internal error: {type(e).__name__}: {_one_line(e)} (set SDRT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
