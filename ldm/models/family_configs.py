"""What an original single file's keys cannot say about a family: its diffusers configs.

The public releases' ``config.json`` fields per component (network, VAE, text encoders,
scheduler), which ``ldm.models.families`` attaches to each family as ``Family.single_file``;
kept apart so the registry reads as one table.
"""

from __future__ import annotations

# scheduler of the original CompVis / Stability releases (what a single file cannot say)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True,
                    set_alpha_to_one=False, clip_sample=False, trained_betas=None)  # fmt: skip


def sdxl_single_file(refiner: bool) -> dict:
    """The public SDXL 1.0 base / refiner diffusers configs (what a single file cannot say)."""
    unet = dict(
        sample_size=128, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, upcast_attention=False,
    )  # fmt: skip
    if refiner:
        unet.update(attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
                    cross_attention_dim=1280, transformer_layers_per_block=4,
                    projection_class_embeddings_input_dim=2560,  # 1280 pooled + 5 ids x 256
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                    "UpBlock2D"])  # fmt: skip
    else:
        unet.update(attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                    cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
                    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 ids x 256
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                    "UpBlock2D"])  # fmt: skip
    bigg = dict(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
                hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                num_hidden_layers=32, projection_dim=1280, max_position_embeddings=77,
                vocab_size=49408, layer_norm_eps=1e-5)  # fmt: skip
    clip_l = dict(architectures=["CLIPTextModel"], hidden_act="quick_gelu", hidden_size=768,
                  intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  projection_dim=768, max_position_embeddings=77, vocab_size=49408,
                  layer_norm_eps=1e-5)  # fmt: skip
    scheduler = dict(SD_SCHEDULER, _class_name="EulerDiscreteScheduler", prediction_type="epsilon",
                     timestep_spacing="leading", interpolation_type="linear",
                     use_karras_sigmas=False, sample_max_value=1.0)  # fmt: skip
    out = dict(unet=unet, vae=dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
               text_encoder_2=bigg, scheduler=scheduler)  # fmt: skip
    if not refiner:
        out["text_encoder"] = clip_l
    return out


def sd3_single_file() -> dict:
    """The public SD3.5-medium diffusers configs (what a single file cannot say)."""
    transformer = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                       num_layers=24, attention_head_dim=64, num_attention_heads=24,
                       joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, pos_embed_max_size=384,
                       dual_attention_layers=list(range(13)), qk_norm="rms_norm")  # fmt: skip
    vae = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
               block_out_channels=[128, 256, 512, 512], force_upcast=True)  # fmt: skip
    clip = dict(architectures=["CLIPTextModelWithProjection"], max_position_embeddings=77,
                vocab_size=49408, layer_norm_eps=1e-5)  # fmt: skip
    clip_l = dict(clip, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                  num_attention_heads=12, num_hidden_layers=12, projection_dim=768)  # fmt: skip
    clip_g = dict(clip, hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
                  num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)  # fmt: skip
    t5 = dict(architectures=["T5EncoderModel"], d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
              num_layers=24, feed_forward_proj="gated-gelu", vocab_size=32128,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True)  # fmt: skip
    scheduler = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000,
                     shift=3.0)  # fmt: skip
    return dict(transformer=transformer, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g,
                text_encoder_3=t5, scheduler=scheduler)  # fmt: skip


def flux_single_file(dev: bool) -> dict:
    """The public FLUX.1-dev / FLUX.1-schnell diffusers configs (what a single file cannot say).

    Both share the transformer's shape (19 double- and 38 single-stream blocks, 24 heads of 128)
    and text encoders (CLIP ViT-L, T5-v1.1-XXL); dev embeds the guidance scale and shifts its
    schedule by image size, schnell (timestep-distilled) does neither.
    """
    transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=dev,
                       axes_dims_rope=[16, 56, 56])  # fmt: skip
    vae = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024,
               block_out_channels=[128, 256, 512, 512], force_upcast=True)  # fmt: skip
    sd3 = sd3_single_file()
    clip_l = dict(sd3["text_encoder"], architectures=["CLIPTextModel"])
    scheduler = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000,
                     shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return dict(transformer=transformer, vae=vae, text_encoder=clip_l,
                text_encoder_2=sd3["text_encoder_3"], scheduler=scheduler)  # fmt: skip
