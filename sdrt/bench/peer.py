"""The peer ONNX path: diffusers' `OnnxStableDiffusionPipeline` (what users of diffusers' ONNX export
run) on the engine dir's standard graphs, with ONNX Runtime's default session options.

diffusers' ONNX pipeline expects the input/output layout of its own export script: `input_ids` int32
-> last hidden state; a UNet that broadcasts a one-element `timestep` over the batch; a VAE decoder fed
`latents / scaling_factor`. sdrt's standard graphs compute the same functions with a different layout
(all hidden states for clip_skip, the scaling inside the VAE graphs, a batched timestep), so each graph
gets a thin adapter of one or two nodes at its inputs/outputs, built in memory; the weights are read
from the engine dir's weights file, nothing is written. Needs diffusers (the `export` extra), a version
that still has `OnnxStableDiffusionPipeline` (deprecated in 0.42, due for removal in 0.43).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdrt.errors import InputError
from sdrt.manifest import Manifest

NAME = "diffusers-onnx"
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _replace_input(graph, old: str, new_input, nodes) -> None:
    """Graph input OLD becomes NEW_INPUT; NODES (put first) compute what OLD was from it."""
    inner = f"{old}__sdrt"
    _rename_uses(graph, old, inner)
    for node in nodes:
        node.output[:] = [inner if o == old else o for o in node.output]
    index = [i.name for i in graph.input].index(old)
    del graph.input[index]
    graph.input.insert(index, new_input)
    for node in reversed(nodes):
        graph.node.insert(0, node)


def _replace_outputs(graph, new_outputs, nodes) -> None:
    del graph.output[:]
    graph.output.extend(new_outputs)
    graph.node.extend(nodes)


def diffusers_graph(component: str, model, scaling_factor: float):
    """MODEL (an sdrt standard graph, an onnx.ModelProto) edited in place to diffusers' ONNX layout."""
    from onnx import TensorProto, helper

    g = model.graph
    io = {t.name: t for t in list(g.input) + list(g.output)}

    def dims(name: str) -> list:
        return [d.dim_param or d.dim_value for d in io[name].type.tensor_type.shape.dim]

    def const(name: str, value: float):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [],
                                                                                [value]))

    f32 = TensorProto.FLOAT
    if component == "text_encoder":  # int32 ids -> the last layer (sdrt: every layer, for clip_skip)
        _replace_input(g, "input_ids", helper.make_tensor_value_info("input_ids", TensorProto.INT32,
                                                                     dims("input_ids")),
                       [helper.make_node("Cast", ["input_ids"], ["input_ids"], to=TensorProto.INT64)])
        last = helper.make_node("Constant", [], ["sdrt_last_layer"],
                                value=helper.make_tensor("sdrt_last_layer", TensorProto.INT64, [], [-1]))
        gather = helper.make_node("Gather", ["hidden_states", "sdrt_last_layer"], ["last_hidden_state"], axis=0)
        _replace_outputs(g, [helper.make_tensor_value_info("last_hidden_state", f32, dims("hidden_states")[1:])],
                         [last, gather])
    elif component == "unet":  # a (1,) or (B,) timestep, broadcast over the batch as diffusers' UNet does
        _replace_input(g, "timestep", helper.make_tensor_value_info("timestep", f32, ["T"]), [
            helper.make_node("Shape", ["sample"], ["sdrt_batch"], start=0, end=1),
            helper.make_node("Expand", ["timestep", "sdrt_batch"], ["timestep"])])
    elif component == "vae_decoder":  # diffusers divides by the scaling factor before the decoder
        scale = helper.make_node("Mul", ["latent_sample", "sdrt_scaling"], ["latent"])
        _replace_input(g, "latent", helper.make_tensor_value_info("latent_sample", f32, dims("latent")),
                       [const("sdrt_scaling", scaling_factor), scale])
        _replace_outputs(g, [helper.make_tensor_value_info("sample", f32, dims("image"))],
                         [helper.make_node("Identity", ["image"], ["sample"])])
    elif component == "vae_encoder":  # diffusers multiplies by the scaling factor after the encoder
        _replace_input(g, "image", helper.make_tensor_value_info("sample", f32, dims("image")),
                       [helper.make_node("Identity", ["sample"], ["image"])])
        _replace_outputs(g, [helper.make_tensor_value_info("latent_sample", f32, dims("latent_mean"))],
                         [const("sdrt_unscaling", 1 / scaling_factor),
                          helper.make_node("Mul", ["latent_mean", "sdrt_unscaling"], ["latent_sample"])])
    else:
        raise ValueError(f"no diffusers layout for component {component!r}")
    return model


def diffusers_feeds(component: str, feeds: dict[str, np.ndarray], scaling_factor: float) -> dict[str, np.ndarray]:
    """sdrt's inputs for COMPONENT (as `ComponentSpec.sample_inputs` makes them) in diffusers' layout."""
    if component == "text_encoder":
        return {"input_ids": feeds["input_ids"].astype(np.int32)}
    if component == "unet":
        return dict(feeds)
    if component == "vae_decoder":
        return {"latent_sample": feeds["latent"] / np.float32(scaling_factor)}
    if component == "vae_encoder":
        return {"sample": feeds["image"]}
    raise ValueError(f"no diffusers layout for component {component!r}")


def session(engine_dir: Path, manifest: Manifest, component: str, provider: str = "cpu"):
    """An ONNX Runtime session of the adapted standard graph, default options (as diffusers makes it)."""
    import onnx

    from sdrt.runtime.backends import onnxruntime

    entry = manifest.components[component]
    # the first ONNX file (a TensorRT export lists its model.plan before it)
    path = Path(engine_dir) / next(f for f in entry.files if f.endswith(".onnx"))
    model = diffusers_graph(component, onnx.load(str(path), load_external_data=False), manifest.vae_scaling_factor)
    # the weights stay in the engine dir's file; the edited graph is only in memory
    folder = {"session.model_external_initializers_file_folder_path": str(path.parent)}
    return onnxruntime.session(model.SerializeToString(), provider, config=folder, providers=[ORT_PROVIDERS[provider]])


class DiffusersOnnxPath:
    """diffusers' OnnxStableDiffusionPipeline on the engine dir's standard graphs (a bench path)."""

    components = True  # measures the component workloads too

    def __init__(self, engine_dir: Path, manifest: Manifest, provider: str = "cpu"):
        if provider not in ORT_PROVIDERS:
            raise InputError(f"{NAME}: diffusers' ONNX pipeline runs ONNX Runtime's cpu or cuda provider, "
                             f"not {provider}")
        if manifest.dims.vae_scale_factor != 8:
            raise InputError(f"{NAME}: diffusers' ONNX pipeline assumes a VAE scale factor of 8; this model has "
                             f"VAE scale factor {manifest.dims.vae_scale_factor}")
        if provider == "cpu" and any(c.precision == "fp16" for c in manifest.components.values()):
            raise InputError(f"{NAME}: an fp16 export is for GPUs; on the CPU the peer is compared in fp32")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import diffusers
                from diffusers import OnnxRuntimeModel, OnnxStableDiffusionPipeline  # noqa: F401
                from transformers import CLIPTokenizerFast

                OnnxRuntimeModel(model=None)  # raises where diffusers has removed it (0.43)
        except (ImportError, ValueError) as e:
            raise InputError(f"{NAME}: needs diffusers with OnnxStableDiffusionPipeline "
                             f"(pip install 'sdrt[export]'): {e}") from None
        self.name = NAME if provider == "cpu" else f"{NAME}-{provider}"
        self.engine_dir, self.manifest, self.provider = Path(engine_dir), manifest, provider
        self._diffusers = diffusers
        self.tokenizer = CLIPTokenizerFast.from_pretrained(self.engine_dir / manifest.tokenizer_dir)
        self.models: dict[str, object] = {}
        self._pipes: dict[str, object] = {}

    def cold_args(self) -> list[str]:
        return [NAME, str(self.engine_dir), self.provider, "0", "1"]

    def _model(self, component: str):
        if component not in self.models:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OnnxRuntimeModel's deprecation notice
                self.models[component] = self._diffusers.OnnxRuntimeModel(
                    model=session(self.engine_dir, self.manifest, component, self.provider))
        return self.models[component]

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> None:
        self._model(component)(**diffusers_feeds(component, feeds, self.manifest.vae_scaling_factor))

    def scheduler(self, sampler: str):
        from sdrt.runtime.samplers import get_sampler

        cls, overrides = get_sampler(sampler).diffusers_config()
        return getattr(self._diffusers, cls).from_config(self.manifest.scheduler_config, **overrides)

    def check_sampler(self, sampler: str) -> None:
        """diffusers' ONNX pipeline multiplies NumPy latents by `init_noise_sigma`, which the sigma-based
        schedulers (Euler, Heun, LMS, DPM2) hold as a torch tensor: their generations fail there."""
        if not isinstance(self.scheduler(sampler).init_noise_sigma, (int, float)):
            raise InputError(f"{self.name}: diffusers' OnnxStableDiffusionPipeline cannot run sampler {sampler} "
                             "(its init_noise_sigma is a torch tensor); ddim, pndm, dpmpp_2m*, unipc, deis work")

    def pipeline(self, sampler: str):
        """diffusers' pipeline with SAMPLER's scheduler (made once per sampler; it resets the
        scheduler at every call)."""
        if sampler in self._pipes:
            return self._pipes[sampler]
        self.check_sampler(sampler)
        scheduler = self.scheduler(sampler)
        log = self._diffusers.utils.logging
        verbosity = log.get_verbosity()
        log.set_verbosity_error()  # its deprecation notice, once per pipeline
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe = self._diffusers.OnnxStableDiffusionPipeline(
                    vae_encoder=self._model("vae_encoder") if "vae_encoder" in self.manifest.components else None,
                    vae_decoder=self._model("vae_decoder"), text_encoder=self._model("text_encoder"),
                    tokenizer=self.tokenizer, unet=self._model("unet"), scheduler=scheduler, safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
        finally:
            log.set_verbosity(verbosity)
        pipe.set_progress_bar_config(disable=True)
        self._pipes[sampler] = pipe
        return pipe

    def generate(self, prompt: str, steps: int, size: int, batch: int, sampler: str, seed: int,
                 latents: np.ndarray | None = None) -> np.ndarray:
        pipe = self.pipeline(sampler)
        return pipe(prompt, height=size, width=size, num_inference_steps=steps, num_images_per_prompt=batch,
                    generator=np.random.RandomState(seed), latents=latents, output_type="np").images

    def unload(self, component: str) -> None:
        self.models.pop(component, None)
        self._pipes.clear()  # they hold the component's session

    def close(self) -> None:
        self.models.clear()
        self._pipes.clear()
