"""LoRA: `--lora FILE[:SCALE]`, loaded through diffusers' own loader (PEFT).

PEFT wraps the attention modules' projections (to_q, to_k, to_v, to_out) and the text encoders' layers; the
attention call itself is untouched, so sdcli's routing serves it as before. Each LoRA is named as A1111 names
it, by its file's stem, and identified by A1111's short hash (the first 12 hex digits of sha256 over a
.safetensors file's tensor data, after its JSON header; over the whole file otherwise), which the PNG recipe
carries as `Lora hashes: "name: hash"` with a `<lora:name:scale>` tag after the prompt, as A1111 writes them.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sdcli.errors import SdcliError, error_line

SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Lora:
    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def hash(self) -> str:
        """A1111's short hash of the file (AddNet's for .safetensors: the tensor data after the header)."""
        stat = self.path.stat()
        return short_hash(str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)

    def key(self) -> dict:
        """What decides the pixels: which LoRA (by content, not path) at which scale."""
        return {"name": self.name, "hash": self.hash, "scale": self.scale}


@lru_cache(maxsize=64)  # asked per image (the recipe): a file is read once while it stays the same
def short_hash(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.lower().endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def parse(spec: str) -> Lora:
    """FILE or FILE:SCALE (a path may hold colons: the scale is the part after the last one, if it is a number)."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    try:
        path, scale = (head, float(tail)) if sep else (spec, 1.0)
    except ValueError:  # no number after the last colon: it is part of the path
        pass
    if not math.isfinite(scale):
        raise SdcliError(f"--lora {spec}: the scale must be a finite number")
    file = Path(path).expanduser()
    if not file.is_file():
        raise SdcliError(f"--lora {spec}: {file} is not a file (give FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
    if file.suffix.lower() not in SUFFIXES:
        raise SdcliError(f"--lora {spec}: {file} is not a LoRA file ({', '.join(SUFFIXES)})")
    return Lora(file, scale)


def parse_all(specs) -> list[Lora]:
    loras = [parse(spec) for spec in specs or []]
    names = [lora.name for lora in loras]
    if len(set(names)) < len(names):
        raise SdcliError(f"--lora: two files named {next(n for n in names if names.count(n) > 1)!r}; A1111's recipe "
                         "names each LoRA by its file name, so give each its own")
    return loras


def keys(specs) -> list[dict] | None:
    """The LoRAs of a run as the recipe and --resume compare them; None without any (as in older recipes)."""
    return [lora.key() for lora in parse_all(specs)] or None


def load(pipe, loras: list[Lora]) -> None:
    """Load each LoRA into the pipeline through diffusers (PEFT) and set its scale. A file that isn't a LoRA
    for this pipeline is one line."""
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise SdcliError(f"{type(pipe).__name__} takes no LoRA in diffusers")
    try:
        import peft  # noqa: F401  (diffusers loads LoRAs through PEFT only)
    except ImportError:
        raise SdcliError("--lora needs the peft package: pip install peft") from None
    import warnings

    names = []
    for i, lora in enumerate(loras):
        name = f"lora{i}-{re.sub(r'[^A-Za-z0-9_-]', '_', lora.name)}"  # adapter names are module names in PEFT
        try:
            with warnings.catch_warnings():  # PEFT warns that a second adapter makes "multiple adapters": it does
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except Exception as exc:
            raise SdcliError(f"cannot load LoRA {lora.path} into this {type(pipe).__name__}: "
                             f"{error_line(exc)}") from None
        if not any(name in found for found in pipe.get_list_adapters().values()):  # diffusers loads nothing quietly
            raise SdcliError(f"cannot load LoRA {lora.path} into this {type(pipe).__name__}: none of its weights fit "
                             "this model's layers (a LoRA for another model family?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


def fuse(pipe) -> None:
    """Merge loaded LoRAs into the weights and drop PEFT's layers: diffusers' fused q/k/v projections would
    otherwise drop the LoRA silently (measured: fusing first keeps the image within 3e-6)."""
    try:
        active = pipe.get_active_adapters()
    except (AttributeError, ValueError):  # a pipeline without LoRA support, or no PEFT
        return
    if active:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
