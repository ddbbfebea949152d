"""Models: the built-in offline ones, and loading real checkpoints from a folder, a file or the Hub cache.

`shapes` is a small SD 1.x pipeline that sdcli trained itself (sdcli/shapes.py, scripts/train_shapes.py): its
weights ship in the package and it makes real pictures, of coloured shapes, offline. `tiny`, `tiny-sdxl`,
`tiny-sd3` and `tiny-flux` are pipelines of each family with random weights that sdcli builds itself (denoiser,
VAE, text encoders and byte-level tokenizers), deterministic and a few MB, so the whole path runs with no
download. Their images are noise: they are for tests and demos, not pictures.
A model's family is known before its weights load (families.py), so an unsupported one costs no download.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from sdcli import families, numerics
from sdcli.errors import SdcliError, error_line
from sdcli.libraries import quiet_libraries

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode map: the 256 symbols a byte-level BPE vocabulary starts from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def tiny_tokenizer():
    """A CLIP tokenizer with a byte-level vocabulary and no merges: one token per character."""
    from transformers import CLIPTokenizer

    symbols = _byte_alphabet()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram, like T5's SentencePiece model) whose pieces are single characters, with and
    without the word-start mark: one token per character, built in code, no download."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip(cls_name: str, tokenizer, **config):
    import transformers

    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **config))


def _t5(tokenizer, **config):
    import transformers

    # dropout_rate 0: a model built from a config is in training mode, and T5's default dropout would make
    # every prompt encode differently
    return transformers.T5EncoderModel(transformers.T5Config(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, **config))


def _seeded(build, device: str = "cpu", dtype=None):
    """Run `build()` with torch's generators seeded to 0 (CUDA's too) on `device` in `dtype`, and give the
    caller's random state back: built-in weights are the same on every machine."""
    import torch

    state, default_dtype = torch.random.get_rng_state(), torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)  # built in its dtype: no full-precision copy of a large model
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(default_dtype)
        torch.random.set_rng_state(state)


TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 77, "projection_dim": 32}
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8}
# SD's 4-level VAE (8× downscale) in miniature, with a single-head mid-block attention
TINY_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16, 32, 64), "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 8, "sample_size": 128}
# SD 3 and Flux: 16 latent channels, no quant convs, a shift besides the scale (their published values)
FLOW_VAE = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_VAE_SCALING = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_SCHEDULE = {"shift": 3.0}
FLUX_SCHEDULE = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _eval(pipe):
    """Inference mode for every component, as from_pretrained leaves them (a model built from a config trains)."""
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny():
    """The built-in `tiny` pipeline. Shaped like SD 1.x in miniature: a 4-level VAE (8× downscale), a UNet
    whose head dim doubles per level (16, 32, as SD 1.x's 40, 80, 160) and a single-head VAE attention."""
    quiet_libraries()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    def build():
        tokenizer = tiny_tokenizer()
        text_encoder = _clip("CLIPTextModel", tokenizer, vocab_size=len(tokenizer), **TINY_CLIP)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)  # SD 1.x's "head dim" is heads
        vae = AutoencoderKL(latent_channels=4, **TINY_VAE)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1)
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    return _eval(_seeded(build))


def tiny_sdxl():
    """`tiny-sdxl`: SDXL in miniature (two CLIP encoders, the second with a projection; text and time
    conditioning; 64-wide heads like SDXL's), 128²."""
    quiet_libraries()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    def build():
        tokenizers = tiny_tokenizer(), tiny_tokenizer()
        encoders = [_clip(cls, t, vocab_size=len(t), **TINY_CLIP)
                    for cls, t in zip(("CLIPTextModel", "CLIPTextModelWithProjection"), tokenizers)]
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
        vae = AutoencoderKL(latent_channels=4, **TINY_VAE)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, add_watermarker=False)

    return _eval(_seeded(build))


def tiny_sd3():
    """`tiny-sd3`: SD 3.5 in miniature. Two CLIP encoders and a T5 whose embeddings form the joint text tokens
    (77 + 256, as in SD 3), an MMDiT of joint-attention blocks with qk RMS-norm, the first with 3.5 Medium's
    second, image-only attention; a 16-channel VAE with its shift. 128², 8×8 image tokens."""
    quiet_libraries()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline

    def build():
        tokenizers = tiny_tokenizer(), tiny_tokenizer(), tiny_t5_tokenizer()
        clips = [_clip("CLIPTextModelWithProjection", t, vocab_size=len(t), **TINY_CLIP) for t in tokenizers[:2]]
        t5 = _t5(tokenizers[2], vocab_size=len(tokenizers[2]), **TINY_T5)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TINY_T5["d_model"], caption_projection_dim=32,
            pooled_projection_dim=2 * TINY_CLIP["projection_dim"], pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm")
        vae = AutoencoderKL(**TINY_VAE, **FLOW_VAE, **SD3_VAE_SCALING)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE), vae=vae,
            text_encoder=clips[0], tokenizer=tokenizers[0], text_encoder_2=clips[1], tokenizer_2=tokenizers[1],
            text_encoder_3=t5, tokenizer_3=tokenizers[2])

    return _eval(_seeded(build))


def tiny_flux():
    """`tiny-flux`: Flux.1-dev in miniature. CLIP's pooled embedding and T5's 512 tokens, one double-stream
    block (joint attention over text + image) and two single-stream ones, rotary positions, distilled guidance,
    latents packed 2×2; a 16-channel VAE with its shift. 128², 8×8 image tokens."""
    quiet_libraries()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    def build():
        clip_tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TINY_T5["d_model"],
            pooled_projection_dim=TINY_CLIP["projection_dim"],
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        return FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
            vae=AutoencoderKL(**TINY_VAE, **FLOW_VAE, **FLUX_VAE_SCALING),
            text_encoder=_clip("CLIPTextModel", clip_tokenizer, vocab_size=len(clip_tokenizer), **TINY_CLIP),
            tokenizer=clip_tokenizer, text_encoder_2=_t5(t5_tokenizer, vocab_size=len(t5_tokenizer), **TINY_T5),
            tokenizer_2=t5_tokenizer)

    pipe = _eval(_seeded(build))
    pipe.default_sample_size = 16  # FluxPipeline fixes its default size at 128 latents (1024²); tiny is 128²
    return pipe


def trained_shapes():
    """`shapes`: the SD 1.x pipeline trained by scripts/train_shapes.py, from the weights inside the package. 64²."""
    quiet_libraries()
    from sdcli import shapes

    return _eval(shapes.load())


# ----- full-size architectures with random weights: for measuring speed and memory offline ---------------

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}
SD_UNET = {"in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32}
MMDIT = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
         "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "qk_norm": "rms_norm"}
FLOW_FULL_VAE = {**SD_VAE, **FLOW_VAE, "sample_size": 1024}
# The published configurations (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-3.5-medium and -large,
# black-forest-labs/FLUX.1-dev); only the tokenizers are sdcli's own small ones.
ARCHITECTURES = {
    "sd15-arch": {
        "pipeline": "StableDiffusionPipeline", "size": 512,
        "denoiser": ("UNet2DConditionModel", {**SD_UNET, "sample_size": 64, "cross_attention_dim": 768,
                                              "attention_head_dim": 8}),
        "vae": {**SD_VAE, "sample_size": 512},
        "text_encoders": [("CLIPTextModel", CLIP_L)],
        "scheduler": ("PNDMScheduler", {**SD_SCHEDULE, "skip_prk_steps": True, "set_alpha_to_one": False}),
    },
    "sd21-arch": {
        "pipeline": "StableDiffusionPipeline", "size": 768,
        "denoiser": ("UNet2DConditionModel", {**SD_UNET, "sample_size": 96, "cross_attention_dim": 1024,
                                              "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}),
        "vae": {**SD_VAE, "sample_size": 768},
        "text_encoders": [("CLIPTextModel", {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                             "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512})],
        "scheduler": ("DDIMScheduler", {**SD_SCHEDULE, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                                        "clip_sample": False}),
    },
    "sdxl-arch": {
        "pipeline": "StableDiffusionXLPipeline", "size": 1024,
        "denoiser": ("UNet2DConditionModel", {
            "in_channels": 4, "out_channels": 4, "sample_size": 128, "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}),
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G)],
        "scheduler": ("EulerDiscreteScheduler", {**SD_SCHEDULE, "timestep_spacing": "leading"}),
    },
    "sd35-medium-arch": {
        "pipeline": "StableDiffusion3Pipeline", "size": 1024,
        "denoiser": ("SD3Transformer2DModel", {**MMDIT, "num_layers": 24, "num_attention_heads": 24,
                                               "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                                               "dual_attention_layers": tuple(range(13))}),
        "vae": {**FLOW_FULL_VAE, **SD3_VAE_SCALING},
        "text_encoders": [("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G),
                          ("T5EncoderModel", T5_XXL)],
        "scheduler": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULE),
    },
    "sd35-large-arch": {
        "pipeline": "StableDiffusion3Pipeline", "size": 1024,
        "denoiser": ("SD3Transformer2DModel", {**MMDIT, "num_layers": 38, "num_attention_heads": 38,
                                               "caption_projection_dim": 2432, "pos_embed_max_size": 192}),
        "vae": {**FLOW_FULL_VAE, **SD3_VAE_SCALING},
        "text_encoders": [("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", CLIP_G),
                          ("T5EncoderModel", T5_XXL)],
        "scheduler": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULE),
    },
    "flux-dev-arch": {
        "pipeline": "FluxPipeline", "size": 1024,
        "denoiser": ("FluxTransformer2DModel", {"patch_size": 1, "in_channels": 64, "num_layers": 19,
                                                "num_single_layers": 38, "attention_head_dim": 128,
                                                "num_attention_heads": 24, "joint_attention_dim": 4096,
                                                "pooled_projection_dim": 768, "guidance_embeds": True,
                                                "axes_dims_rope": (16, 56, 56)}),
        "vae": {**FLOW_FULL_VAE, **FLUX_VAE_SCALING},
        "text_encoders": [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)],
        "scheduler": ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULE),
    },
}


def architecture(name: str, device: str = "cpu", dtype=None):
    """A full-size pipeline with random weights, built directly on `device` in `dtype` (no CPU or fp32 copy of
    a GPU model; 'meta' builds shapes only). Deterministic per device and dtype. Not for images: its pictures
    are noise."""
    quiet_libraries()
    import inspect

    import diffusers

    spec = ARCHITECTURES[name]
    pipeline_cls = getattr(diffusers, spec["pipeline"])
    denoiser_cls, denoiser_config = spec["denoiser"]
    denoiser = "unet" if denoiser_cls.startswith("UNet") else "transformer"

    def build():
        parts = {denoiser: getattr(diffusers, denoiser_cls)(**denoiser_config),
                 "vae": diffusers.AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])}
        for i, (cls, config) in enumerate(spec["text_encoders"]):
            suffix = f"_{i + 1}" if i else ""
            if cls == "T5EncoderModel":
                tokenizer = tiny_t5_tokenizer()
                parts[f"text_encoder{suffix}"] = _t5(tokenizer, **config)
            else:
                tokenizer = tiny_tokenizer()
                parts[f"text_encoder{suffix}"] = _clip(cls, tokenizer, vocab_size=49408, max_position_embeddings=77,
                                                       **config)
            parts[f"tokenizer{suffix}"] = tokenizer
        return parts

    parts = _seeded(build, device, dtype)
    cls_name, config = spec["scheduler"]
    parts["scheduler"] = getattr(diffusers, cls_name)(**config)
    if "safety_checker" in inspect.signature(pipeline_cls).parameters:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _eval(pipeline_cls(**parts))


TINY = {"shapes": trained_shapes, "tiny": tiny, "tiny-sdxl": tiny_sdxl, "tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux}
# name -> build(device, torch dtype)
BUILTIN = {**{n: (lambda device, dtype, build=build: build()) for n, build in TINY.items()},
           **{n: (lambda device, dtype, n=n: architecture(n, device, dtype)) for n in ARCHITECTURES}}


def _offline() -> bool:
    from huggingface_hub.constants import HF_HUB_OFFLINE

    return bool(HF_HUB_OFFLINE)


def resolve(model: str) -> tuple[str, str]:
    """Say what `model` names, before anything heavy loads: (kind, location). Raises SdcliError if nothing."""
    if model in BUILTIN:
        return "builtin", model
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdcliError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise SdcliError(f"{path} is not a checkpoint: expected a .safetensors or .ckpt file or a diffusers folder")
        return "checkpoint", str(path)
    looks_like_path = model.startswith((".", "/", "~")) or path.suffix.lower() in CHECKPOINT_SUFFIXES
    if looks_like_path or model.count("/") > 1:
        raise SdcliError(f"model path {model} does not exist")
    if model.count("/") == 1 and all(model.split("/")):  # owner/name
        return "hub", model
    raise SdcliError(f"model {model!r} not found: not a built-in ({', '.join(BUILTIN)}), a folder, a checkpoint "
                     "file or a Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5")


@functools.lru_cache(maxsize=16)  # asked before loading and again by the loader: a .ckpt is read once
def recognise(model: str) -> families.Family:
    """The model's family, from what can be read before any weights load: a built-in's name, model_index.json's
    `_class_name` (folder or Hub), or a checkpoint's tensor names and shapes. Unsupported ones are refused here."""
    kind, where = resolve(model)
    if kind == "builtin":
        return families.of_builtin(where)
    if kind == "checkpoint":
        return families.of_checkpoint(_checkpoint_type(where), where)
    return families.of_class(str(_model_index(kind, where).get("_class_name")), where)


def _model_index(kind: str, where: str) -> dict:
    path = Path(where) / "model_index.json" if kind == "folder" else Path(_hub_file(where, "model_index.json"))
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdcliError(f"cannot read {path}: {error_line(exc)}") from None
    if not isinstance(index, dict):
        raise SdcliError(f"{path} is not a diffusers model index")
    return index


def load(model: str, dtype: str = "fp32", device: str = "cpu"):
    """Load a pipeline in `dtype` on `device`; returns (pipeline, name for the image recipe)."""
    kind, where = resolve(model)
    family = recognise(model)
    quiet_libraries()
    torch_dtype = numerics.torch_dtype(dtype)
    if kind == "builtin":
        pipe, name = BUILTIN[where](device, torch_dtype), where
    elif kind == "folder":
        pipe, name = _from_folder(where, torch_dtype), Path(where).name
    elif kind == "checkpoint":
        pipe, name = _from_checkpoint(where, family, torch_dtype), Path(where).stem
    else:
        pipe, name = _from_hub(where, torch_dtype), where
    pipe.to(device=device, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def _no_safety_checker(index: dict) -> dict:
    # Like the web UIs, sdcli does not run the NSFW checker: it costs time and blanks images at random.
    return {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}


def _from_folder(folder: str, torch_dtype):
    from diffusers import DiffusionPipeline

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
        return DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype, local_files_only=True,
                                                 **_no_safety_checker(index))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise SdcliError(f"cannot load the pipeline in {folder}: {error_line(exc)}") from None


def _checkpoint_tensors(path: str) -> dict:
    """A checkpoint's tensors by name: shape-only stand-ins on the meta device for safetensors (nothing loads),
    the tensors themselves for .ckpt (pickles can't be read in part)."""
    import torch

    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data.get("state_dict", data) if isinstance(data, dict) else {}
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # torch's advice runs over many lines: one line that is whole
            raise SdcliError(f"cannot read checkpoint {path}: besides tensors it holds Python objects, which torch's "
                             "safe loader refuses (sdcli runs no code from a model file); if you trust its source, "
                             "convert it to .safetensors or a diffusers folder (diffusers' "
                             "scripts/convert_original_stable_diffusion_to_diffusers.py)") from None
        raise SdcliError(f"cannot read checkpoint {path}: {error_line(exc)}") from None


def _checkpoint_type(path: str) -> str:
    """diffusers' own name for what a checkpoint holds, inferred from its tensor names and shapes."""
    quiet_libraries()
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    tensors = _checkpoint_tensors(path)
    model_type = infer_diffusers_model_type(tensors)
    if model_type == "v1" and not any(k.startswith("model.diffusion_model.") for k in tensors):  # diffusers' fallback
        raise SdcliError(f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    return model_type


def config_repo(path: str) -> str | None:
    """The Hub repo whose configuration and tokenizers diffusers builds a single-file checkpoint's pipeline from
    (a checkpoint holds weights only): diffusers' own choice for the checkpoint's type."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    return DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(_checkpoint_type(path), {}).get("pretrained_model_name_or_path")


def check_config_reachable(path: str) -> None:
    """Before a checkpoint's weights load: its configuration must be in the Hub cache or downloadable."""
    repo = config_repo(path)
    if repo is None or _in_hub_cache(repo, "model_index.json"):
        return
    why = "HF_HUB_OFFLINE is set" if _offline() else None if _hub_reachable() else "the Hub can't be reached"
    if why:
        raise SdcliError(f"{path} is a single file, which holds weights only: diffusers builds its pipeline from "
                         f"the configuration and tokenizers of {repo} on the Hub, which are not in the Hub cache, "
                         f"and {why}; on a connected machine run once: hf download {repo} --include '*.json' "
                         "'*.txt' '*.model' (a few MB), or convert the checkpoint to a diffusers folder")


def _from_checkpoint(path: str, family: families.Family, torch_dtype):
    import inspect

    import diffusers

    check_config_reachable(path)
    cls = getattr(diffusers, family.pipelines[0])
    has_checker = "safety_checker" in inspect.signature(cls.__init__).parameters
    extra = {"safety_checker": None, "requires_safety_checker": False} if has_checker else {}
    try:
        return cls.from_single_file(path, dtype=torch_dtype, local_files_only=_offline(), **extra)
    except Exception as exc:
        repo = config_repo(path)
        hint = (f"; a single file takes its configuration and tokenizers from {repo} on the Hub (hf download {repo} "
                "--include '*.json' '*.txt' '*.model'), or convert it to a diffusers folder") if repo else ""
        raise SdcliError(f"cannot load checkpoint {path}: {error_line(exc)}{hint}") from None


def _from_hub(repo: str, torch_dtype):
    from diffusers import DiffusionPipeline

    try:
        index = json.loads(Path(_hub_file(repo, "model_index.json")).read_text())
        return DiffusionPipeline.from_pretrained(repo, dtype=torch_dtype, local_files_only=_offline(),
                                                 **_no_safety_checker(index))
    except SdcliError:
        raise
    except Exception as exc:
        raise SdcliError(f"cannot load {repo} from the Hub: {error_line(exc)}") from None


def _in_hub_cache(repo: str, filename: str) -> str | None:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached, or a cache that can't be read: either way, not here
        return None


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    cached = _in_hub_cache(repo, filename)
    if cached:
        return cached
    where = f"download it on a connected machine (hf download {repo}), or pass a local folder, or --model tiny"
    if _offline():
        raise SdcliError(f"{repo} is not in the Hub cache and HF_HUB_OFFLINE is set: {where}")
    if not _hub_reachable():
        raise SdcliError(f"{repo} is not in the Hub cache and the Hub can't be reached: {where}")
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:
        raise SdcliError(f"{repo} is not in the Hub cache and could not be downloaded ({error_line(exc)}): "
                         f"{where}") from None


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick connect to the Hub's host: huggingface_hub itself retries for half a minute before giving up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False
