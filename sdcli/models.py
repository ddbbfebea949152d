"""Models: the built-in offline ones, and loading real checkpoints from a folder, a file or the Hub cache.

`tiny` is a Stable Diffusion pipeline with random weights that sdcli builds itself (UNet, VAE, CLIP text
encoder and a byte-level tokenizer), deterministic and a few MB, so the whole path runs with no download.
Its images are noise: it is for tests and demos, not pictures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdcli import SdcliError, error_line, families, numerics

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def quiet_libraries() -> None:
    """transformers and diffusers log optional-dependency notices at import; sdcli's output stays clean."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    import huggingface_hub

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


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


def tiny():
    """The built-in `tiny` pipeline. Shaped like SD 1.x in miniature: a 4-level VAE (8× downscale), a UNet
    whose head dim doubles per level (16, 32, as SD 1.x's 40, 80, 160) and a single-head VAE attention."""
    quiet_libraries()
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # weights come from torch's CPU generator: the same on every machine
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)  # SD 1.x's "head dim" is heads
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=128)
    finally:
        torch.random.set_rng_state(state)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


# ----- full-size architectures with random weights: for measuring speed and memory offline ---------------

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}
SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
# The published configurations (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0); only the tokenizer is sdcli's own byte-level one.
ARCHITECTURES = {
    "sd15-arch": {
        "pipeline": "StableDiffusionPipeline", "size": 512,
        "unet": {**SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": {**SD_VAE, "sample_size": 512},
        "text_encoders": [("CLIPTextModel", CLIP_L)],
        "scheduler": ("PNDMScheduler", {**SD_SCHEDULE, "skip_prk_steps": True, "set_alpha_to_one": False}),
    },
    "sd21-arch": {
        "pipeline": "StableDiffusionPipeline", "size": 768,
        "unet": {**SD_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                 "use_linear_projection": True},
        "vae": {**SD_VAE, "sample_size": 768},
        "text_encoders": [("CLIPTextModel", {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                             "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512})],
        "scheduler": ("DDIMScheduler", {**SD_SCHEDULE, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                                        "clip_sample": False}),
    },
    "sdxl-arch": {
        "pipeline": "StableDiffusionXLPipeline", "size": 1024,
        "unet": {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
                 "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": [("CLIPTextModel", CLIP_L),
                          ("CLIPTextModelWithProjection", {"hidden_size": 1280, "intermediate_size": 5120,
                                                           "num_hidden_layers": 32, "num_attention_heads": 20,
                                                           "hidden_act": "gelu", "projection_dim": 1280})],
        "scheduler": ("EulerDiscreteScheduler", {**SD_SCHEDULE, "timestep_spacing": "leading"}),
    },
}


def architecture(name: str, device: str = "cpu"):
    """A full-size pipeline with random weights, built directly on `device` (no CPU copy of a GPU model;
    'meta' builds shapes only). Deterministic per device. Not for images: its pictures are noise."""
    quiet_libraries()
    import diffusers
    import torch
    import transformers

    spec = ARCHITECTURES[name]
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # seeds the CUDA generators too
    try:
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
            vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
            encoders, tokenizers = [], []
            for cls, cfg in spec["text_encoders"]:
                tokenizer = tiny_tokenizer()
                encoders.append(getattr(transformers, cls)(transformers.CLIPTextConfig(
                    vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)))
                tokenizers.append(tokenizer)
    finally:
        torch.random.set_rng_state(state)
    cls_name, cfg = spec["scheduler"]
    parts = {"vae": vae, "unet": unet, "scheduler": getattr(diffusers, cls_name)(**cfg),
             "text_encoder": encoders[0], "tokenizer": tokenizers[0]}
    if len(encoders) == 2:
        parts.update(text_encoder_2=encoders[1], tokenizer_2=tokenizers[1])
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, spec["pipeline"])(**parts)


BUILTIN = {"tiny": lambda device: tiny(), **{n: (lambda device, n=n: architecture(n, device)) for n in ARCHITECTURES}}


def describe_builtins() -> dict[str, str]:
    arch = {n: f"{n.split('-')[0].upper()} architecture at {s['size']}², published configuration, random weights: "
               "for speed and memory, not images" for n, s in ARCHITECTURES.items()}
    return {"tiny": "random-weight SD 1.x-shaped pipeline, 128², a few MB, built offline (images are noise)", **arch}


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


def load(model: str, dtype: str = "fp32", device: str = "cpu"):
    """Load a pipeline in `dtype` on `device`; returns (pipeline, name for the image recipe)."""
    kind, where = resolve(model)
    quiet_libraries()
    torch_dtype = numerics.torch_dtype(dtype)
    if kind == "builtin":
        pipe, name = BUILTIN[where](device), where
    elif kind == "folder":
        pipe, name = _from_folder(where, torch_dtype), Path(where).name
    elif kind == "checkpoint":
        pipe, name = _from_checkpoint(where, torch_dtype), Path(where).stem
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


def _checkpoint_keys(path: str) -> list[str]:
    """The tensor names in a checkpoint, read without loading the weights (safetensors) or fully (.ckpt)."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        return list((data.get("state_dict", data) if isinstance(data, dict) else {}).keys())
    except Exception as exc:
        raise SdcliError(f"cannot read checkpoint {path}: {error_line(exc)}") from None


def _from_checkpoint(path: str, torch_dtype):
    import inspect

    import diffusers

    family = families.of_checkpoint(_checkpoint_keys(path))
    if family is None:
        raise SdcliError(f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    cls = getattr(diffusers, family.pipelines[0])
    has_checker = "safety_checker" in inspect.signature(cls.__init__).parameters
    extra = {"safety_checker": None, "requires_safety_checker": False} if has_checker else {}
    try:
        return cls.from_single_file(path, dtype=torch_dtype, local_files_only=_offline(), **extra)
    except Exception as exc:
        hint = ("; single-file loading needs the model's config from the Hub cache: run once online, or convert "
                "the checkpoint to a diffusers folder") if _offline() else ""
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


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        pass
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
