"""Write a diffusers SD 1.x pipeline as an original LDM / A1111 single-file checkpoint.

The inverse of diffusers' own single-file conversion (diffusers.loaders.single_file_utils), for
any number of levels and layers per block, so the tests can make single files from the tiny
checkpoints. `to_ldm` checks itself: diffusers' converters must give back every original tensor.
"""

from __future__ import annotations

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, layers: int, has_attention: dict[int, bool]) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    n = layers + 1  # LDM blocks per level: the resnets (+ attentions), then the down/upsampler

    def resnet(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{RESNET[name]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{n * int(m[1]) + int(m[2]) + 1}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{n * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"output_blocks.{n * int(m[1]) + layers}.{2 if has_attention[int(m[1])] else 1}.conv.{m[2]}"
    raise KeyError(key)


def _vae_key(key: str, levels: int) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):  # LDM counts up blocks from the bottom
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    raise KeyError(key)


OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def _open_clip(state: dict) -> dict:
    """A flat transformers CLIPTextModel state dict as OpenCLIP's text tower (SD 2.x files):
    q/k/v fused into in_proj, the position embedding a bare tensor."""
    import torch

    out = {"positional_embedding": state["embeddings.position_embedding.weight"],
           "token_embedding.weight": state["embeddings.token_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in OPEN_CLIP.items():
                out[dst + f"{theirs}.{kind}"] = state[src + f"{ours}.{kind}"]
    return out


def to_ldm(pipe, open_clip: bool = False) -> dict:
    """The pipeline's weights under LDM keys (model.diffusion_model., first_stage_model., and
    cond_stage_model.transformer. for SD 1.x's CLIP or cond_stage_model.model. for SD 2.x's
    OpenCLIP), as the original checkpoints store them."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet_cfg, vae_cfg = dict(pipe.unet.config), dict(pipe.vae.config)
    has_attention = {i: "CrossAttn" in t for i, t in enumerate(unet_cfg["up_block_types"])}
    out = {}
    for key, t in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(key, unet_cfg["layers_per_block"], has_attention)] = t
    for key, t in pipe.vae.state_dict().items():
        ldm = _vae_key(key, len(vae_cfg["block_out_channels"]))
        out["first_stage_model." + ldm] = t[:, :, None, None] if ".mid.attn_1." in ldm and t.ndim == 2 else t
    # LDM files hold transformers' CLIPTextModel keys from before it was flattened (transformers 5.6)
    flat = not hasattr(pipe.text_encoder, "text_model")
    text = pipe.text_encoder.state_dict()
    if open_clip:
        assert flat, "written for transformers >= 5.6"
        out |= {"cond_stage_model.model." + k: t for k, t in _open_clip(text).items()}
    else:
        out |= {"cond_stage_model.transformer." + ("text_model." if flat else "") + k: t for k, t in text.items()}
    out = {k: v.detach().contiguous().clone() for k, v in out.items()}

    # the check: diffusers' converters give back every tensor under its original name
    for part, back in (("unet", convert_ldm_unet_checkpoint(out, unet_cfg)),
                       ("vae", convert_ldm_vae_checkpoint(out, vae_cfg)),
                       ("text_encoder", {k.removeprefix("text_model.") if flat else k: v for k, v in (
                           convert_open_clip_checkpoint(pipe.text_encoder, out) if open_clip
                           else convert_ldm_clip_checkpoint(out)).items()})):
        want = getattr(pipe, part).state_dict()
        assert back.keys() == want.keys(), (part, sorted(set(back) ^ set(want))[:5])
        assert all(back[k].equal(want[k]) for k in want), part
    return out
