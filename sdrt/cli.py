"""The `sdrt` command. Errors: one line on stderr; exit 2 for bad input, 1 for failures."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from sdrt.errors import InputError, SdrtError, one_line

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


def _request(args):
    """The GenerateRequest the generate flags describe (the flags are derived from it: _add_request_flags);
    with --from-png, the PNG's parameters, with the flags given (those not at their defaults) on top."""
    from sdrt.runtime.request import GenerateRequest, from_parameters

    fields = GenerateRequest.fields(python_only=False)
    given = {f.name: getattr(args, f.name) for f in fields}
    if args.from_png is None:
        if args.prompt is None:
            raise InputError("a prompt is needed (or --from-png FILE to take it and the settings from a PNG)")
        return GenerateRequest.make(**given)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.from_png) as im:
            text = im.info.get("parameters")
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"--from-png {args.from_png}: {e}") from None
    if not text:
        raise InputError(f"--from-png {args.from_png}: the image has no A1111 `parameters` text")
    changed = {f.name: given[f.name] for f in fields if given[f.name] != f.default and given[f.name] is not None}
    return GenerateRequest.make(**(from_parameters(text) | changed))


def _interruptible(pipe, fn):
    """Run FN in a worker thread so that Ctrl-C reaches this one at once: it interrupts the pipeline,
    which stops the engine call in progress (ONNX Runtime's terminate flag), waits for the worker to
    leave the engines (a process must not exit while ONNX Runtime runs), then re-raises here."""
    out, done = {}, threading.Event()

    def work():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the main thread
            out["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="sdrt-generate", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        pipe.interrupt()
        done.wait()
        raise
    if "error" in out:
        raise out.pop("error")
    return out["value"]


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from sdrt.runtime.images import numbered_paths, save_png
    from sdrt.runtime.pipeline import Pipeline

    out = Path(args.output)
    if args.preview_every is not None and args.preview_every < 1:
        raise InputError(f"--preview-every {args.preview_every}: must be a step count >= 1")
    if out.suffix.lower() != ".png":
        raise InputError(f"-o {args.output}: the output must be a .png file")
    if not out.parent.exists():
        raise InputError(f"-o {args.output}: directory {out.parent} does not exist")
    req = _request(args)
    pipe = Pipeline.load(args.engines, provider=args.provider, verify=args.verify)
    if args.embeddings_dir:
        pipe.load_embeddings(args.embeddings_dir)
    pipe.set_lora_dir(args.lora_dir)
    bars = []

    def progress(step, total, latents, denoised):  # the bar starts with the first step, after validation
        if not bars:
            bars.append(tqdm(total=total, unit="step", desc="generate", disable=args.quiet, file=sys.stderr))
        bars[0].update(1)
        if args.preview_every and (step + 1) % args.preview_every == 0 and step + 1 < total:
            _write_previews(pipe, denoised, step + 1, out, args.preview_decode)

    t0 = time.perf_counter()
    try:
        with pipe:
            result = _interruptible(pipe, lambda: pipe(req, callback=progress))
    finally:
        for bar in bars:
            bar.close()  # before any message: "sdrt: interrupted" starts on a line of its own
    for image, text, path in zip(result.images, result.parameters, numbered_paths(out, len(result.images))):
        save_png(image, path, text)
        print(path)
    log.info("%d image(s) in %.1f s (seed %d)", len(result.images), time.perf_counter() - t0, result.seeds[0])
    return 0


def _write_previews(pipe, denoised, step: int, out: Path, mode: str) -> None:
    """OUT-step0005.png (NAME-i-step0005.png for batches): the step's denoised estimate."""
    from sdrt.runtime.preview import preview_images

    shots = preview_images(pipe, denoised, mode)
    for i, image in enumerate(shots):
        image.save(out.with_name(f"{out.stem}{f'-{i}' if len(shots) > 1 else ''}-step{step:04d}.png"))


def cmd_verify(args) -> int:
    from tqdm.auto import tqdm

    from sdrt.manifest import Manifest

    d = Path(args.engine_dir)
    m = Manifest.read(d)  # sizes
    if not m.files:
        raise InputError(f"{d} was exported before sdrt recorded file hashes: nothing to verify against; re-export")
    total = sum(r["size"] for r in m.files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.quiet, file=sys.stderr) as bar:
        m.check_files(d, verify=True, progress=bar.update)
    print(f"{d}: {len(m.files)} files, {total / 2**20:,.1f} MiB, sizes and sha256 as recorded")
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

    settings = bench.Settings(sizes=args.sizes or [], repeats=args.repeats, warmup=args.warmup,
                              steps=args.steps[0], more_steps=args.steps[1:], batches=args.batches,
                              sampler=args.sampler, providers=args.providers, plain=args.plain, also=args.also,
                              eager=not args.no_eager, peer=not args.no_peer,
                              cold=not args.no_cold, cold_steps=args.cold_steps, components=not args.no_components,
                              end_to_end=not args.no_end_to_end,
                              cache_intervals=args.cache_intervals, optimum=[] if args.no_optimum else args.optimum,
                              optimum_python=args.optimum_python)
    if args.repeats < 1 or args.warmup < 0 or min(args.steps) < 1 or min(args.batches) < 1:
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
    try:
        from sdrt.serve import ServeConfig
    except ImportError as e:
        raise InputError(f"sdrt serve needs the serve extra ({e.name} is missing): pip install 'sdrt[serve]'") from None

    config = ServeConfig(Path(args.engines), provider=args.provider, max_images=args.max_images,
                         max_queue=args.max_queue, max_batch=args.max_batch, batching=args.batching,
                         timeout=args.timeout,
                         api_key=args.api_key or os.environ.get("SDRT_API_KEY") or None,
                         cors=tuple(args.cors), warmup=not args.no_warmup,
                         embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
                         lora_dir=Path(args.lora_dir) if args.lora_dir else None)
    if args.ray:
        from sdrt.serve.ray_app import serve_on_ray

        return serve_on_ray(config, args.host, args.port, replicas=args.replicas, address=args.ray_address,
                            autoscaling=_json_arg("--ray-autoscaling", args.ray_autoscaling))
    from sdrt.serve import create_app, listen, run

    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach it can generate (--api-key)", args.host)
    app = create_app(config)  # loads the engine dir: bad arguments fail here, before the port is taken
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    pipe = app.state.service.pipe
    print(f"sdrt serve: {args.engines} ({pipe.manifest.pipeline}, provider {pipe.provider}) on "
          f"http://{host}:{port}  (docs: /docs; Ctrl-C or SIGTERM drains and stops)", flush=True)
    run(app, sock, drain_timeout=config.timeout, access_log=not args.quiet)
    print("sdrt serve: stopped", file=sys.stderr)
    return 0


def _json_arg(flag: str, text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object such as '{{\"min_replicas\": 1, \"max_replicas\": 4}}'")
    return value


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
    if m.pipeline == "depth2img":
        p = m.depth_processor
        print("depth          " + (f"estimator input {p.width}x{p.height} (resample {p.resample}, mean {p.image_mean}, "
                                   f"std {p.image_std})" if p else "no estimator: give --depth-map"))
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
        if c.guided:
            print(f"  guided graphs (a guided batch's shared part computed once): {', '.join(c.guided.values())}")
        if c.weight_map:
            layers = len(json.loads((d / c.weight_map).read_text())["layers"])
            print(f"  weight map: {c.weight_map} ({layers} layers LoRAs may adapt per request)")
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


def _add_export(sub, parents) -> None:
    from sdrt.export import BACKENDS, PRECISIONS
    from sdrt.runtime.denoiser import PREDICTION_TYPES

    e = sub.add_parser("export", parents=parents, help="checkpoint -> engine dir (ONNX + manifest.json)")
    e.add_argument("source", help="diffusers folder, .safetensors / .ckpt file, hub id, 'tiny' or 'random-sd15'")
    e.add_argument("out_dir")
    e.add_argument("--backend", default="onnx", choices=BACKENDS)
    e.add_argument("--precision", default="fp32", choices=PRECISIONS)
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23)")
    e.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    e.add_argument("--trt-batch", type=int, nargs=3, default=[1, 1, 4], metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT profile: images per call (default 1 1 4)")
    e.add_argument("--trt-sizes", type=int, nargs=3, default=[256, 512, 1024], metavar=("MIN", "OPT", "MAX"),
                   help="TensorRT profile: image side in pixels (default 256 512 1024)")
    e.add_argument("--config", default=None, metavar="DIR",
                   help="single-file sources: a diffusers folder with the model's configs (default: SD 1.x "
                        "or 2.x, detected from the file)")
    e.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
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


_FLAG_TYPES = {"text": str, "int": int, "number": float, "choice": str, "image": str}
LORA_DIR_HELP = ("LoRA files (.safetensors, .pt) that <lora:NAME:WEIGHT> in prompts names by file stem, as A1111's "
                 "Lora folder; applied per request, no re-export")


def lora_flag(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] on generate (sdrt.runtime.lora.parse_flag)."""
    from sdrt.runtime.lora import parse_flag

    return parse_flag(text)


def add_request_flags(parser) -> None:
    """One flag per GenerateRequest field (sdrt.runtime.request), with its default, help and choices;
    the prompt is positional. The limits are checked by the request itself."""
    from sdrt.runtime.request import GenerateRequest

    for f in GenerateRequest.fields(python_only=False):
        m = f.metadata
        default = "" if f.default is None else f" (default {f.default})"
        if f.name == "prompt":
            parser.add_argument("prompt", nargs="?", help=m["help"])
            continue
        flag = m["cli"] or "--" + f.name.replace("_", "-")
        if m["kind"] == "loras":
            parser.add_argument(flag, dest=f.name, type=lora_flag, action="append", metavar="FILE[:WEIGHT]",
                                help=m["help"] + " (repeatable)")
            continue
        parser.add_argument(flag, dest=f.name, type=_FLAG_TYPES[m["kind"]], default=f.default,
                            choices=m["choices"] if f.name == "schedule_type" else None,
                            metavar="PATH" if m["kind"] == "image" else flag[2:].replace("-", "_").upper(),
                            help=m["help"] + default)


def _add_generate(sub, parents) -> None:
    from sdrt.runtime.backends import AUTO, PROVIDERS
    from sdrt.runtime.preview import PREVIEW_MODES

    g = sub.add_parser("generate", parents=parents, help="prompt -> PNG (A1111 'parameters' metadata included)")
    add_request_flags(g)
    g.add_argument("--engines", required=True, help="engine dir written by `sdrt export`")
    g.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings (.safetensors, .pt, "
                   ".bin) prompts may name by file stem, as A1111's embeddings folder")
    g.add_argument("--lora-dir", metavar="DIR", help=LORA_DIR_HELP)
    g.add_argument("--from-png", metavar="FILE", help="take the prompt, settings, seed and noise source from the "
                   "A1111 `parameters` of FILE (an sdrt or A1111 PNG); flags given as well override them")
    g.add_argument("-o", "--output", default="sdrt.png", help="PNG path; with --batch N: NAME-0.png ...")
    g.add_argument("--provider", default="cpu", choices=[AUTO, *PROVIDERS],
                   help="cpu (ONNX Runtime), cuda / tensorrt (ONNX Runtime GPU), openvino (bf16 on CPUs "
                        "with bf16 units), openvino-fp32; auto: the fastest for these engines on this machine")
    g.add_argument("--verify", action="store_true", help="check every engine file's sha256 before loading")
    g.add_argument("--preview-every", type=int, default=None, metavar="N",
                   help="every N steps, write the step's denoised estimate beside -o (OUT-step0005.png)")
    g.add_argument("--preview-decode", choices=PREVIEW_MODES, default="cheap",
                   help="previews by A1111's 'Approx cheap' latent->RGB map (default) or a full VAE decode")
    g.set_defaults(fn=cmd_generate)


def _add_bench(sub, parents) -> None:
    from sdrt.runtime.backends import AUTO, PROVIDERS
    from sdrt.runtime.samplers import DEFAULT_SAMPLER

    b = sub.add_parser("bench", parents=parents, help="sdrt engines vs eager PyTorch, side by side")
    b.add_argument("engine_dir", help="an engine dir, or a model source to export first into a temporary one "
                   "(tiny, random-sd15, a diffusers folder, a hub id)")
    b.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in px (default: the model's)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds per workload")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    b.add_argument("--steps", type=int, nargs="+", default=[10],
                   help="steps of the end-to-end generations, one or more counts (the first: cold starts too)")
    b.add_argument("--batches", type=int, nargs="+", default=[1], help="end-to-end batch sizes")
    b.add_argument("--sampler", default=DEFAULT_SAMPLER)
    b.add_argument("--providers", nargs="+", default=["cpu"], choices=[AUTO, *PROVIDERS],
                   help="one sdrt path per runtime provider (e.g. cpu openvino)")
    b.add_argument("--plain", action="store_true",
                   help="also the standard graphs without sdrt.kernels rewrites (first provider)")
    b.add_argument("--also", nargs="+", default=[], metavar="ENGINE_DIR",
                   help="more engine dirs of the same model (e.g. an int8 export), on every provider")
    b.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch baseline")
    b.add_argument("--no-peer", action="store_true",
                   help="skip diffusers' OnnxStableDiffusionPipeline on the standard graphs (the peer ONNX path)")
    b.add_argument("--cache-intervals", type=int, nargs="+", default=[], metavar="N",
                   help="also each sdrt path's generations with feature caching every N steps (e.g. 3)")
    from sdrt.bench.optimum_peer import MODES as OPTIMUM_MODES

    b.add_argument("--optimum", nargs="+", default=list(OPTIMUM_MODES), choices=OPTIMUM_MODES,
                   help="optimum-intel's OVStableDiffusionPipeline configurations to compare with (CPU runs)")
    b.add_argument("--no-optimum", action="store_true", help="skip the optimum-intel peer")
    b.add_argument("--optimum-python", default=None, metavar="PYTHON",
                   help="the interpreter that has optimum-intel (its own venv; default $SDRT_OPTIMUM_PYTHON, "
                        "else this one)")
    b.add_argument("--no-cold", action="store_true", help="skip the cold-start subprocesses")
    b.add_argument("--cold-steps", type=int, default=None, metavar="N",
                   help="steps of the cold starts' generation (default: the first --steps)")
    b.add_argument("--no-components", action="store_true", help="whole generations only")
    b.add_argument("--no-end-to-end", action="store_true", help="components only")
    b.add_argument("--out", default="bench-results", help="directory for results.json/.md/.png")
    b.set_defaults(fn=cmd_bench)


def _add_serve(sub, parents) -> None:
    from sdrt.runtime.backends import AUTO, PROVIDERS
    from sdrt.runtime.request import MAX_IMAGES

    v = sub.add_parser("serve", parents=parents, help="an engine dir behind sdrt's, OpenAI's and A1111's HTTP APIs")
    v.add_argument("--engines", required=True, help="engine dir from `sdrt export`")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--provider", default="cpu", choices=[AUTO, *PROVIDERS],
                   help="auto: the fastest for these engines on this machine (see `sdrt generate --help`)")
    v.add_argument("--max-images", type=int, default=4,
                   help=f"most images one request may ask for (at most {MAX_IMAGES})")
    v.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more get 429 (default 16)")
    v.add_argument("--max-batch", type=int, default=8,
                   help="images that compatible waiting requests may share one generation with; with --batching "
                        "continuous, images generating at once (default 8)")
    v.add_argument("--batching", choices=("queue", "continuous"), default="queue",
                   help="queue: waiting requests with the same size, steps, sampler and guidance run as one batch; "
                        "continuous: every request joins the running UNet calls at its next step, whatever its "
                        "settings (default queue)")
    v.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival (default 600; X-Sdrt-Timeout lowers it)")
    v.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $SDRT_API_KEY; none: open)")
    v.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; default: none)")
    v.add_argument("--no-warmup", action="store_true", help="create the sessions on the first request")
    v.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings prompts may name (by "
                   "file stem, as A1111's embeddings folder)")
    v.add_argument("--lora-dir", metavar="DIR", help=LORA_DIR_HELP + "; clients name them in prompts or in `loras`")
    v.add_argument("--ray", action="store_true", help="run on Ray Serve (pip install 'sdrt[ray]')")
    v.add_argument("--replicas", type=int, default=1, help="--ray: replicas, each with its own pipeline")
    v.add_argument("--ray-address", help="--ray: a running cluster ('auto', or ray://HOST:10001); "
                                          "default: start a local one")
    v.add_argument("--ray-autoscaling", metavar="JSON",
                   help="--ray: Ray Serve's autoscaling_config, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    v.set_defaults(fn=cmd_serve)


def _add_small(sub, parents) -> None:
    i = sub.add_parser("info", help="describe an engine dir")
    i.add_argument("engine_dir")
    i.add_argument("--json", action="store_true", help="print manifest.json")
    i.set_defaults(fn=cmd_info)
    v = sub.add_parser("verify", parents=parents, help="check every engine file's size and sha256")
    v.add_argument("engine_dir")
    v.set_defaults(fn=cmd_verify)
    s = sub.add_parser("samplers", help="list sampler names")
    s.set_defaults(fn=cmd_samplers)


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__

    p = _Parser(prog="sdrt", description="Stable Diffusion on ONNX Runtime / TensorRT engines, no torch.")
    p.add_argument("--version", action="version", version=f"sdrt {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    quiet = _Parser(add_help=False)  # -q works after the subcommand too
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or info logs")
    for add in (_add_export, _add_generate, _add_bench, _add_serve, _add_small):
        add(sub, [quiet])
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdrt").setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser().parse_args(argv)
        args.argv = argv  # as typed, for reports that say how to reproduce them
        _setup_logging(args.quiet)
        return args.fn(args)
    except SdrtError as e:
        print(f"sdrt: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `sdrt samplers | head`: stop quietly (Python docs' SIGPIPE advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)  # progress bars were closed: this is a line of its own
        return 130
    except Exception as e:  # a bug: one line unless SDRT_DEBUG asks for the traceback
        if os.environ.get("SDRT_DEBUG"):
            raise
        print(f"sdrt: internal error: {type(e).__name__}: {one_line(e)} (set SDRT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
