"""Model families, declared in one place: how sdcli recognises each, and what in it has attention to route.

A family names the diffusers pipeline classes it covers (model_index.json's `_class_name`), the tensor
names that mark one of its single-file checkpoints, its denoiser (the component that runs every step,
whose config gives the native size), the components whose `Attention` modules sdcli routes and which
of their processor classes it may replace, how latents become images, and sdcli's built-in models of
that family. A new family (a transformer denoiser, other processors, its own decode) is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sdcli import SdcliError

STOCK_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")  # diffusers' own, F.sdpa inside


def decode_vae(pipe, latents):
    """diffusers' own decode path for SD and SDXL (scaling, optional latent mean/std, VAE, postprocess), in the
    VAE's dtype."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean = latents.new_tensor(mean).view(shape)
        std = latents.new_tensor(std).view(shape)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]             # diffusers pipeline classes; the first loads single-file checkpoints
    checkpoint_keys: tuple[str, ...]       # tensor-name prefixes that all occur in a single-file checkpoint
    builtins: tuple[str, ...] = ()         # sdcli's built-in models of this family (models.BUILTIN)
    denoiser: str = "unet"                 # the component that runs every step
    routed: tuple[str, ...] = ("unet", "vae")        # components whose attention sdcli routes
    processors: tuple[str, ...] = STOCK_PROCESSORS   # processor classes sdcli may replace there
    decode: Callable = decode_vae          # (pipe, latents) -> images as float arrays in [0, 1]

    def native_size(self, pipe) -> int:
        return getattr(pipe, self.denoiser).config.sample_size * pipe.vae_scale_factor


FAMILIES = [
    Family("SD 1.x/2.x", ("StableDiffusionPipeline",), ("model.diffusion_model.",),
           builtins=("tiny", "sd15-arch", "sd21-arch")),
    Family("SDXL", ("StableDiffusionXLPipeline",), ("model.diffusion_model.", "conditioner.embedders.1"),
           builtins=("sdxl-arch",)),
]


def of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline: by its class (or a base class), else the first family whose denoiser it
    has (e.g. an img2img variant)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for family in FAMILIES:
        if any(name in family.pipelines for name in names):
            return family
    for family in FAMILIES:
        if getattr(pipe, family.denoiser, None) is not None:
            return family
    raise SdcliError(f"sdcli does not know {type(pipe).__name__}: it routes "
                     + ", ".join(p for f in FAMILIES for p in f.pipelines))


def of_checkpoint(keys: list[str]) -> Family | None:
    """The family of a single-file checkpoint from its tensor names: the most specific one that matches."""
    matches = [f for f in FAMILIES if all(any(k.startswith(p) for k in keys) for p in f.checkpoint_keys)]
    return max(matches, key=lambda f: len(f.checkpoint_keys), default=None)
