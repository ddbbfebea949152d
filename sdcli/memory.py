"""Will a run fit? Its largest tensors, estimated from the model's configuration before the weights load, against
what the device has free.

A size that can't fit would otherwise start anyway: on a CPU it grows memory until the system kills it, or sits
for many minutes inside one attention call. Three things grow with the image while the weights don't:
- the attention scores (queries × keys per head) of the largest self-attention, where they are computed whole:
  by a kernel that builds them (sdpa-math, eager flex), and by the exact reference that judges kernels (auto's
  measured plan, compare, bench: batch 1, in fp64 for fp32 runs, else fp32). Fused kernels never hold them.
  The largest self-attention is the denoiser's first attention block (SD 1.x: H/8·W/8 tokens, SDXL, SD 3 and
  Flux: H/16·W/16, the latter two with their text tokens) or the VAE's mid-block (H/8·W/8 tokens, one head);
- the VAE decoder's activations at full resolution (three tensors as wide as its second level);
the largest of these must fit. The estimate is a floor (the weights and the rest come on top), so a size it
refuses can't run, and one it lets through may still run out of memory (bench's batch search measures that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdcli.errors import SdcliError

GiB = 2**30
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
WHOLE_SCORES = ("sdpa-math", "flex")  # the backends that build the score matrix (the rest are fused kernels)


@dataclass(frozen=True)
class Footprint:
    """What decides a model's largest tensors at a given size, from its configuration."""

    native: int            # the size it makes when given none
    heads: int             # heads of the denoiser's largest self-attention
    token_px: int          # pixels per token side there
    text_tokens: int = 0   # text tokens in the same sequence (joint attention: SD 3, Flux)
    vae_scale: int = 8     # pixels per latent side
    vae_channels: int = 256  # the VAE decoder's widest activation at full resolution

    def tokens(self, width: int, height: int) -> int:
        return (width // self.token_px) * (height // self.token_px) + self.text_tokens

    def vae_tokens(self, width: int, height: int) -> int:
        return (width // self.vae_scale) * (height // self.vae_scale)


# The published models of each family (SD 1.5, SDXL base, SD 3.5 Medium, Flux.1-dev), for models whose
# configuration can't be read before loading (single-file checkpoints, Hub models not in the cache).
FAMILY = {
    "SD 1.x/2.x": Footprint(512, heads=8, token_px=8),
    "SDXL": Footprint(1024, heads=10, token_px=16),
    "SD 3/3.5": Footprint(1024, heads=24, token_px=16, text_tokens=77 + 256),
    "Flux.1": Footprint(1024, heads=24, token_px=16, text_tokens=512),
}
# sdcli's small built-ins (tests/test_memory.py checks these against the built pipelines)
TINY = {
    "shapes": Footprint(64, heads=2, token_px=4, vae_scale=4, vae_channels=32),
    "tiny": Footprint(128, heads=2, token_px=8, vae_channels=16),
    "tiny-sdxl": Footprint(128, heads=4, token_px=16, vae_channels=16),
    "tiny-sd3": Footprint(128, heads=2, token_px=16, text_tokens=77 + 256, vae_channels=16),
    "tiny-flux": Footprint(128, heads=2, token_px=16, text_tokens=512, vae_channels=16),
}


def of_configs(family, denoiser: dict, vae: dict, native: int | None = None) -> Footprint:
    """A model's footprint from its denoiser's and VAE's configurations (diffusers' config.json)."""
    base = FAMILY[family.name]
    levels = vae.get("block_out_channels") or (128, 256, 512, 512)
    vae_scale = 2 ** (len(levels) - 1)
    vae_channels = levels[1] if len(levels) > 1 else levels[0]
    if family.denoiser == "unet":
        types = list(denoiser.get("down_block_types") or [])
        level = next((i for i, t in enumerate(types) if "CrossAttn" in t), 0)
        heads = denoiser.get("num_attention_heads") or denoiser.get("attention_head_dim") or base.heads  # SD's "head
        heads = heads[level] if isinstance(heads, (list, tuple)) else heads  # dim" counts heads (diffusers' note)
        token_px = vae_scale * 2**level
    else:  # a token is a patch of latents; Flux packs 2×2 latents into one before its 1×1 patches
        heads = denoiser.get("num_attention_heads") or base.heads
        packed = 2 if "FluxPipeline" in family.pipelines else 1
        token_px = vae_scale * packed * (denoiser.get("patch_size") or 1)
    sample = denoiser.get("sample_size")
    native = native or (sample * vae_scale if isinstance(sample, int) and family.denoiser == "unet" else base.native)
    return Footprint(native, int(heads), token_px, base.text_tokens, vae_scale, vae_channels)


def footprint(model: str, family) -> Footprint:
    """Before the weights load: a built-in's own, a folder's or a cached Hub model's configuration, else the
    family's published one."""
    from sdcli import models

    kind, where = models.resolve(model)
    if where in TINY:
        return TINY[where]
    if where in models.ARCHITECTURES:
        spec = models.ARCHITECTURES[where]
        return of_configs(family, spec["denoiser"][1], spec["vae"], spec["size"])
    if kind in ("folder", "hub"):
        try:
            denoiser, vae = (_config(kind, where, f"{part}/config.json") for part in (family.denoiser, "vae"))
            return of_configs(family, denoiser, vae)
        except (OSError, ValueError, TypeError, SdcliError):
            pass
    return FAMILY[family.name]


def _config(kind: str, where: str, name: str) -> dict:
    if kind == "folder":
        path = Path(where) / name
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(where, name, local_files_only=True))
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a configuration")
    return data


def needs(fp: Footprint, width: int, height: int, batch: int, cfg: bool, dtype: str, vae_dtype: str,
          whole_scores: bool, judged: bool) -> list[tuple[str, int]]:
    """(what, bytes) of the largest tensors at this size: the peak is at least the largest of them."""
    rows = batch * (2 if cfg else 1)
    wide = 8 if dtype == "fp32" else 4  # the exact reference: fp64 for fp32 runs, else fp32
    tokens, vae_tokens = fp.tokens(width, height), fp.vae_tokens(width, height)
    out = [("the VAE decoder's activations", 3 * batch * fp.vae_channels * width * height * BYTES[vae_dtype])]
    if whole_scores:  # scores and their softmax, both whole
        out += [("the denoiser's attention scores, computed whole by this backend",
                 2 * rows * fp.heads * tokens**2 * BYTES[dtype]),
                ("the VAE's attention scores, computed whole by this backend",
                 2 * batch * vae_tokens**2 * BYTES[vae_dtype])]
    if judged:
        out += [("the exact attention that judges kernels at the denoiser's largest shape",
                 2 * fp.heads * tokens**2 * wide),
                ("the exact attention that judges kernels at the VAE's shape", 2 * vae_tokens**2 * wide)]
    return out


def available(machine) -> tuple[int | None, str]:
    """Bytes the device has for this run, and a sentence to put them in: a GPU's free memory, or the RAM the OS
    says is available (MemAvailable). None where it can't be read."""
    if machine.is_cuda:
        free = (machine.gpu or {}).get("memory_free_gb")
        return (int(free * GiB) if free is not None else None), f"{machine.gpu_label} has {{}} free"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "this machine has {} available"
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has {} free"
        except (ValueError, OSError, AttributeError):
            return None, ""


def must_fit(options, family, machine, dtype: str, vae_dtype: str, judged: bool) -> None:
    """Refuse, before the model loads, a size whose largest tensors alone don't fit the device: exit 2, naming
    what doesn't fit and the largest size (keeping the proportions of the sides given) that would."""
    have, where = available(machine)
    if have is None:
        return
    sampling, batch = options.sampling, options.work.batch_size
    auto_judges = options.attention.backend == "auto" and options.attention.tune
    fp = footprint(options.model, family)
    width, height = sampling.width or fp.native, sampling.height or fp.native
    cfg = family.guidance == "cfg" and (sampling.guidance or 0) > 1
    whole = options.attention.backend in WHOLE_SCORES
    judged = judged or auto_judges

    def peak(w: int, h: int) -> tuple[str, int]:
        return max(needs(fp, w, h, batch, cfg, dtype, vae_dtype, whole, judged), key=lambda n: n[1])

    what, need = peak(width, height)
    if need <= have:
        return
    step = family.size_multiple
    scaled = [side for side, given in (("width", sampling.width), ("height", sampling.height)) if given]
    fits = largest_fitting(width, height, step, scaled, lambda w, h: peak(w, h)[1] <= have) if scaled else None
    size = f"{width}x{height}" + (f" at --batch-size {batch}" if batch > 1 else "")
    text = (f"{size} can't fit: it needs about {need / GiB:,.1f} GiB for {what} alone, and "
            f"{where.format(f'{have / GiB:,.1f} GiB')}")
    if fits:
        text += f"; the largest size that fits is --width {fits[0]} --height {fits[1]}"
    elif batch > 1:
        text += "; try a smaller --batch-size"
    unjudged = max(n for _, n in needs(fp, width, height, batch, cfg, dtype, vae_dtype, whole, False))
    if auto_judges and unjudged <= have:
        text += "; or skip auto's judging, which computes exact attention whole: --no-tune, or --backend sdpa"
    raise SdcliError(text)


def largest_fitting(width: int, height: int, step: int, scaled: list[str], fits) -> tuple[int, int] | None:
    """The largest (width, height) with the sides in `scaled` shrunk by one factor (to multiples of `step`) for
    which fits(w, h) holds; None if not even `step` fits."""
    def at(f: float) -> tuple[int, int]:
        w = max(step, int(width * f) // step * step) if "width" in scaled else width
        h = max(step, int(height * f) // step * step) if "height" in scaled else height
        return w, h

    if not fits(*at(0.0)):
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(*at(mid)) else (low, mid)
    return at(low)

