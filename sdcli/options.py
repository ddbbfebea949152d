"""What a run is asked to do, as frozen values: made once from the command's options (or the API's keywords), checked
before anything loads, and never written to afterwards (a variant is `dataclasses.replace`).

- `Work`: the prompts, how many images of each, the seed they count from, the batch size, where they go;
- `Sampling`: how each image is sampled (negative prompt, steps, guidance, size, scheduler, LoRAs);
- `Placement`: where it runs (device, dtypes, CPU threads);
- `AttentionChoice`: the backend, fallback, quantized kernels, whether auto measures its plan;
- `Speed`: the speed options (fused q/k/v, channels-last, torch.compile, TF32, cuDNN's autotuner), which key auto's
  measured plans as they are.

`Options` holds the model and the five. Defaults that need the model's family or chance (guidance, the seed) are
filled once, by pipeline.resolve; those that need the machine (device, dtype) by pipeline.prepare, in the Run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from sdcli import backends, devices, families, images, lora
from sdcli.speed import COMPILE_MODES
from sdcli.errors import SdcliError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
SCHEDULER_NAMES = list(dict.fromkeys(name for f in families.FAMILIES for name in f.schedulers))  # every family's


@dataclass(frozen=True)
class Work:
    prompts: tuple[str, ...] = ()
    num_images: int = 1          # per prompt
    seed: int | None = None      # None: a random one (pipeline.resolve), recorded in every image
    batch_size: int = 1
    output_dir: Path | None = Path("outputs")  # None: nothing is written (the Python API's compare)

    def __post_init__(self):  # as the command line or the API gives them
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "output_dir", None if self.output_dir is None else Path(self.output_dir))


@dataclass(frozen=True)
class Sampling:
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float | None = None  # None: the pipeline's own default (pipeline.resolve)
    width: int | None = None       # None: the model's native size
    height: int | None = None
    scheduler: str = "default"
    loras: tuple[str, ...] = ()    # "FILE[:SCALE]", loaded through diffusers (sdcli.lora)

    def __post_init__(self):
        object.__setattr__(self, "loras", tuple(self.loras or ()))


@dataclass(frozen=True)
class Placement:
    device: str | None = None  # None or "auto": cuda if usable, else cpu
    dtype: str = "auto"
    vae_dtype: str = "auto"
    threads: int | None = None  # torch's CPU threads; None: torch's own


@dataclass(frozen=True)
class AttentionChoice:
    backend: str = "auto"
    fallback: bool = False
    quantized: bool = False
    tune: bool = True          # `auto` measures its plan on first use (sdcli.tuning); False: the documented order
    retune: bool = False


@dataclass(frozen=True)
class Speed:
    """The speed options, as given: with the machine, model, size and batch, they key auto's measured plan."""

    fuse_qkv: bool = False     # diffusers' fused q/k/v projections
    channels_last: bool = False
    compile: bool = False      # torch.compile the denoiser (UNet or transformer)
    compile_vae: bool = False  # torch.compile the VAE's decode
    compile_mode: str = "default"  # torch.compile's mode (speed.COMPILE_MODES)
    tf32: bool = True          # TF32 for fp32 matmuls and convolutions on CUDA (diffusers' advice)
    cudnn_benchmark: bool = False  # cuDNN's autotuner for the convolutions


GROUPS = {"work": Work, "sampling": Sampling, "placement": Placement, "attention": AttentionChoice, "speed": Speed}
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}
# The order of the options in a run's JSON (`settings`), as it has always been
FLAT = ("prompts", "negative_prompt", "model", "steps", "guidance", "width", "height", "seed", "batch_size",
        "num_images", "scheduler", "dtype", "vae_dtype", "device", "backend", "fallback", "quantized", "tune", "retune",
        "compile", "compile_mode", "compile_vae", "channels_last", "fuse_qkv", "tf32", "cudnn_benchmark", "loras",
        "threads", "output_dir")


@dataclass(frozen=True)
class Options:
    model: str = DEFAULT_MODEL
    work: Work = field(default_factory=Work)
    sampling: Sampling = field(default_factory=Sampling)
    placement: Placement = field(default_factory=Placement)
    attention: AttentionChoice = field(default_factory=AttentionChoice)
    speed: Speed = field(default_factory=Speed)

    @classmethod
    def make(cls, model: str = DEFAULT_MODEL, **values) -> "Options":
        """Options from their flat names (the commands' options with underscores: steps=, backend=, fuse_qkv=, ...)."""
        unknown = sorted(set(values) - set(GROUP_OF))
        if unknown:
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        return cls(model, **{group: kind(**{k: v for k, v in values.items() if GROUP_OF[k] == group})
                             for group, kind in GROUPS.items()})

    def get(self, name: str):
        """One option by its flat name."""
        return self.model if name == "model" else getattr(getattr(self, GROUP_OF[name]), name)

    def flat(self) -> dict:
        """Every option by its flat name, JSON-ready, in the order a run's JSON has always had (`settings`)."""
        data = {name: self.get(name) for name in FLAT}
        data.update(prompts=list(data["prompts"]), loras=list(data["loras"]),
                    output_dir=None if data["output_dir"] is None else str(data["output_dir"]))
        return data

    def validate(self) -> None:
        """Every check that needs no model: bad input fails here, before anything loads."""
        work, sampling, placement, speed = self.work, self.sampling, self.placement, self.speed
        if not work.prompts or any(not p.strip() for p in work.prompts):
            raise SdcliError("give a prompt, or --prompts-file with one prompt per line")
        if not self.model.strip():
            raise SdcliError("--model is empty; give tiny, a Hub id, a folder or a checkpoint file")
        devices.parse(placement.device)
        for name in ("width", "height"):
            value = getattr(sampling, name)
            if value is not None and (value <= 0 or value % 8):
                raise SdcliError(f"--{name} must be a positive multiple of 8, not {value}")
        for name in ("steps", "batch_size", "num_images"):
            if self.get(name) < 1:
                raise SdcliError(f"--{name.replace('_', '-')} must be at least 1, not {self.get(name)}")
        if sampling.guidance is not None and (not math.isfinite(sampling.guidance) or sampling.guidance < 0):
            raise SdcliError(f"--guidance must be a finite number ≥ 0, not {sampling.guidance}")
        if work.seed is not None and not 0 <= work.seed < 2**63 - len(work.prompts) * work.num_images:
            raise SdcliError(f"--seed must be between 0 and 2**63, not {work.seed}")
        if sampling.scheduler != "default" and sampling.scheduler not in SCHEDULER_NAMES:
            raise SdcliError(f"unknown --scheduler {sampling.scheduler!r}; choose default, {', '.join(SCHEDULER_NAMES)}")
        for name in ("dtype", "vae_dtype"):
            if getattr(placement, name) not in DTYPE_CHOICES:
                raise SdcliError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_CHOICES)}")
        if speed.compile_mode not in COMPILE_MODES:
            raise SdcliError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, not {speed.compile_mode!r}")
        if speed.compile_mode != "default" and not (speed.compile or speed.compile_vae):
            raise SdcliError("--compile-mode needs --compile or --compile-vae")
        if placement.threads is not None and placement.threads < 1:
            raise SdcliError(f"--threads must be at least 1, not {placement.threads}")
        lora.parse_all(sampling.loras)
        if self.attention.backend != "auto":
            backends.get(self.attention.backend)  # an unknown name fails here
        if work.output_dir is not None:
            images.check_writable(work.output_dir)
