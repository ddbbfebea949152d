"""Model families, declared in one place: how sdcli recognises each, and what in it has attention to route.

A family names the diffusers pipeline classes it covers (model_index.json's `_class_name`), diffusers'
names for its single-file checkpoints, its denoiser (the component that runs every step), the
schedulers that fit its training objective, what its guidance means, the sizes it takes, and
sdcli's built-in models of that family. Everything else (text encoders, latent packing, VAE scaling
and shift, decoding) is the pipeline's own. A new family is one more entry. Routing needs no family:
it routes every attention call of any pipeline (sdcli.routing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdcli.errors import SdcliError

# name -> (diffusers scheduler class, config overrides, A1111 sampler name)
SD_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
}
# Flow matching (SD 3, Flux): the model predicts a velocity; DPM++ and UniPC take it with flow sigmas.
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
    "euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler Karras"),
    "dpm++2m": ("DPMSolverMultistepScheduler", FLOW, "DPM++ 2M"),
    "unipc": ("UniPCMultistepScheduler", FLOW, "UniPC"),
}


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]             # diffusers pipeline classes; the first loads single-file checkpoints
    checkpoints: tuple[str, ...]           # diffusers' names for its checkpoints (infer_diffusers_model_type)
    builtins: tuple[str, ...] = ()         # sdcli's built-in models of this family (models.BUILTIN)
    denoiser: str = "unet"                 # the component that runs every step
    schedulers: dict = field(default_factory=lambda: SD_SCHEDULERS, repr=False)
    guidance: str = "cfg"                  # "cfg": classifier-free (doubles the batch); "distilled": an input
    size_multiple: int = 8                 # width and height are multiples of this
    negative_prompt: bool = True
    no_fuse_qkv: str = ""                  # why diffusers' fused q/k/v projections would change its results

    def native_size(self, pipe) -> int:
        """The size the pipeline makes when given none: its own default (SD 1.x's pipeline has none: the UNet's)."""
        latent = getattr(pipe, "default_sample_size", None) or getattr(pipe, self.denoiser).config.sample_size
        return latent * pipe.vae_scale_factor

    def default_guidance(self, pipe_class: str | None = None) -> float:
        """The pipeline's own default guidance scale, read from its signature (diffusers decides)."""
        import inspect

        from sdcli.libraries import quiet_libraries

        quiet_libraries()
        import diffusers

        call = getattr(diffusers, pipe_class or self.pipelines[0]).__call__
        return inspect.signature(call).parameters["guidance_scale"].default

    def refuse_unfit(self, scheduler: str, negative_prompt: str | None, width: int | None, height: int | None,
              fuse_qkv: bool = False) -> None:
        """Settings that only some families take fail here, in one line, before anything loads."""
        if fuse_qkv and self.no_fuse_qkv:
            raise SdcliError(f"--fuse-qkv does not fit {self.name}: {self.no_fuse_qkv}")
        if scheduler != "default" and scheduler not in self.schedulers:
            raise SdcliError(f"--scheduler {scheduler} does not fit {self.name}; choose default, "
                             f"{', '.join(self.schedulers)}")
        if negative_prompt and not self.negative_prompt:
            raise SdcliError(f"{self.name} has distilled guidance and no negative prompt; leave out --negative-prompt")
        for option, value in (("width", width), ("height", height)):
            if value is not None and value % self.size_multiple:
                raise SdcliError(f"--{option} must be a multiple of {self.size_multiple} for {self.name}, not {value}")


FAMILIES = [
    Family("SD 1.x/2.x", ("StableDiffusionPipeline",), ("v1", "v2"), builtins=("shapes", "tiny", "sd15-arch", "sd21-arch")),
    Family("SDXL", ("StableDiffusionXLPipeline",), ("xl_base",), builtins=("tiny-sdxl", "sdxl-arch")),
    # an MMDiT: image and text tokens attend jointly; patch size 2 over 8× latents makes 16-pixel steps
    Family("SD 3/3.5", ("StableDiffusion3Pipeline",), ("sd3", "sd35_medium", "sd35_large"),
           builtins=("tiny-sd3", "sd35-medium-arch", "sd35-large-arch"), denoiser="transformer",
           schedulers=FLOW_SCHEDULERS, size_multiple=16,
           no_fuse_qkv="diffusers' FusedJointAttnProcessor2_0 skips the q/k norms (and fails on SD 3.5 Medium's "
                       "second attention, which has no text), so the pictures would change"),
    # its processors call diffusers' dispatcher; latents packed 2×2 (16-pixel steps); FluxPipeline takes a negative
    # prompt only for "true CFG", off by default
    Family("Flux.1", ("FluxPipeline",), ("flux-dev", "flux-schnell"), builtins=("tiny-flux", "flux-dev-arch"),
           denoiser="transformer", schedulers=FLOW_SCHEDULERS, guidance="distilled", size_multiple=16,
           negative_prompt=False),
]


def supported() -> str:
    return ", ".join(f"{p} ({f.name})" for f in FAMILIES for p in f.pipelines)


def of_class(class_name: str, where: str) -> Family:
    """The family of a pipeline class named in a model_index.json; an unknown one is refused in one line."""
    for family in FAMILIES:
        if class_name in family.pipelines:
            return family
    raise SdcliError(f"{where} holds a {class_name}, which sdcli does not run; it runs {supported()}")


def of_builtin(name: str) -> Family:
    return next(f for f in FAMILIES if name in f.builtins)


def of_checkpoint(model_type: str, where: str) -> Family:
    """The family of a single-file checkpoint, by the name diffusers infers for it from its tensors."""
    for family in FAMILIES:
        if model_type in family.checkpoints:
            return family
    raise SdcliError(f"{where} is a {model_type!r} checkpoint (diffusers' name for it), which sdcli does not run; "
                     f"it runs {supported()}")


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
