"""More diffusers pipeline classes, built tiny and offline, to show that sdcli.route serves any pipeline whose
attention goes through torch's SDPA or diffusers' dispatcher, family known or not. Seeded: the same weights in
every process."""

from sdcli import models


def sd_controlnet():
    """Stable Diffusion with a ControlNet (a model of its own, with its own attention), from the tiny SD pipeline."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = models.tiny()
    controlnet = models._seeded(lambda: ControlNetModel.from_unet(pipe.unet, conditioning_channels=3))
    return models._eval(StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet))


def sd_pag():
    """Stable Diffusion with perturbed-attention guidance: diffusers swaps its own PAG processors in on the chosen
    layers, and runs them on every call."""
    from diffusers import StableDiffusionPAGPipeline

    return models._eval(StableDiffusionPAGPipeline(**models.tiny().components, pag_applied_layers=["mid"]))


def pixart_sigma():
    """PixArt-Σ: a DiT (diffusers' Attention with AttnProcessor2_0) over T5 text tokens with their attention mask."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    def build():
        tokenizer = models.tiny_t5_tokenizer()
        text_encoder = models._t5(tokenizer, vocab_size=len(tokenizer), **models.TINY_T5)
        transformer = PixArtTransformer2DModel(
            sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
            out_channels=8, cross_attention_dim=32, caption_channels=models.TINY_T5["d_model"],
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
        return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                                   vae=AutoencoderKL(latent_channels=4, **models.TINY_VAE),
                                   scheduler=DPMSolverMultistepScheduler())

    return models._eval(models._seeded(build))


def kandinsky22():
    """Kandinsky 2.2's decoder: a UNet whose attention adds the image embedding's keys and values
    (AttnAddedKVProcessor2_0), decoded by MoVQ (a VQ model with a spatially-normed attention)."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    def build():
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image", down_block_types=("ResnetDownsampleBlock2D",
            "SimpleCrossAttnDownBlock2D"), up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
            encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=64, attention_head_dim=16,
            resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=8, sample_size=16)
        movq = VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                       in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                       num_vq_embeddings=12, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                       vq_embed_dim=4)
        scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  steps_offset=1, prediction_type="epsilon")
        return KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)

    return models._eval(models._seeded(build))


def wan():
    """Wan 2.1 (text to video): a transformer whose processors call diffusers' dispatcher, over UMT5 text tokens; its
    3D VAE computes its own attention with torch's SDPA outside any diffusers attention module (not routed)."""
    import transformers
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def build():
        tokenizer = models.tiny_t5_tokenizer()
        text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0, feed_forward_proj="gated-gelu", dropout_rate=0.0, **models.TINY_T5))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=models.TINY_T5["d_model"], freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))

    return models._eval(models._seeded(build))
