"""The architectures sdrt knows, as diffusers / transformers configs: the built-in random-weight
models and the SD 1.x / 2.x layouts single-file checkpoints are detected as. One table, read by the
model sources (sdrt.export.sources) and the single-file loader (sdrt.export.single_file)."""

BUILTIN_SEED = 0

# SD 1.x scheduler config (as in the v1-5 checkpoint's scheduler/scheduler_config.json)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}

# Full-size SD 1.5: UNet 860M, CLIP ViT-L/14 text encoder, SD VAE.
SD15 = {
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
    "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280)),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}

# The SD 1.x architecture scaled down: 4-level VAE (scale factor 8), 2-level UNet, 4-layer CLIP.
TINY = {
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=4, projection_dim=32, hidden_act="quick_gelu"),
    "unet": dict(sample_size=16, cross_attention_dim=32, attention_head_dim=8,
                 block_out_channels=(32, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, sample_size=128, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}

BUILTIN = {"tiny": TINY, "random-sd15": SD15}

# SD 2.x (stabilityai/stable-diffusion-2-1): OpenCLIP ViT-H/14's text tower without its last layer
# (SD 2 conditions on the penultimate one), linear attention projections, per-level heads, v-prediction
SD2 = {
    "text_encoder": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                         num_hidden_layers=23, projection_dim=512, hidden_act="gelu"),
    "unet": dict(SD15["unet"], sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True),
    "vae": dict(SD15["vae"], sample_size=768),
}
SD2_SCHEDULER = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")

# inpainting checkpoints (stable-diffusion-inpainting, stable-diffusion-2-inpainting): the same modules
# with a 9-channel UNet input (latents, mask, masked-image latents); SD 2's is a 512 px epsilon model
SD15_INPAINT = dict(SD15, unet=dict(SD15["unet"], in_channels=9))
SD2_INPAINT = dict(SD2, unet=dict(SD2["unet"], in_channels=9, sample_size=64), vae=dict(SD2["vae"], sample_size=512))
# SD 2 depth (512-depth-ema, stabilityai/stable-diffusion-2-depth): a 5-channel UNet input (latents and
# depth), 512 px, epsilon; the DPT depth estimator is not in the single file
SD2_DEPTH = dict(SD2, unet=dict(SD2["unet"], in_channels=5, sample_size=64), vae=dict(SD2["vae"], sample_size=512))

# diffusers' name for a checkpoint's architecture (infer_diffusers_model_type) -> what sdrt writes for it
ARCHITECTURES = {
    "v1": ("SD 1.x", SD15, SD15_SCHEDULER, None),
    "v2": ("SD 2.x", SD2, SD2_SCHEDULER, "!"),
    "inpainting": ("SD 1.x inpainting", SD15_INPAINT, SD15_SCHEDULER, None),
    "inpainting_v2": ("SD 2.x inpainting", SD2_INPAINT, dict(SD2_SCHEDULER, prediction_type="epsilon"), "!"),
    # diffusers detects these as "v2"; sdrt tells them by the UNet's input channels (single_file.DEPTH_CHANNELS)
    "depth_v2": ("SD 2.x depth", SD2_DEPTH, dict(SD2_SCHEDULER, prediction_type="epsilon"), "!"),
}
