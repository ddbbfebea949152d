"""Images on disk: each PNG carries its recipe, and is written atomically under a name never taken before.

The recipe is kept twice: as A1111's `parameters` text chunk, which the web UIs, CivitAI and ComfyUI
read, and as a JSON `sdcli` chunk with every setting and the library versions. Writing goes to a
temporary file that is then linked into place, so a file is whole or absent, and never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from sdcli import lora
from sdcli._version import __version__
from sdcli.errors import SdcliError


def _quote(value) -> str:
    """A1111's rule: values with a comma, colon or newline are JSON-quoted."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def attention_summary(router) -> str:
    """e.g. `sdpa-flash (unet 16 layers), sdpa-efficient (vae 2 layers)`: backends that served calls."""
    per: dict[str, dict[str, int]] = {}
    for layer in router.layers:
        part = layer.name.split(".")[0]
        for backend in layer.served():
            per.setdefault(backend, {}).setdefault(part, 0)
            per[backend][part] += 1
    return ", ".join(f"{b} ({', '.join(f'{p} {n} layer' + 's' * (n != 1) for p, n in parts.items())})"
                     for b, parts in per.items())


# What decides an image's pixels besides its prompt and seed: the README's "same seed, backend, batch size and
# machine: the same pixels", and every option that changes what runs (model, size, steps, dtypes, scheduler,
# speed options, ...). The recipe keeps them as given; --resume counts an image as done only when all match.
PIXEL_SETTINGS = ("model", "negative_prompt", "steps", "guidance", "width", "height", "scheduler", "dtype",
                  "vae_dtype", "device", "backend", "fallback", "quantized", "tune", "batch_size", "compile",
                  "compile_mode", "compile_vae", "channels_last", "fuse_qkv", "tf32", "cudnn_benchmark", "loras")


def pixel_settings(options) -> dict:
    """PIXEL_SETTINGS of a run's options (sdcli.options.Options), as given (the guidance and seed resolved)."""
    data = {name: options.get(name) for name in PIXEL_SETTINGS}
    # cpu, or auto for any GPU: a launcher gives each rank its own cuda:N, and the same GPU makes the same pixels
    data["device"] = "cpu" if options.placement.device == "cpu" else "auto"
    data["loras"] = lora.keys(options.sampling.loras)  # by content and scale, not path; None without any, as before
    return data


def recipe(run, item) -> dict:
    """Everything that made `item` in `run` (a pipeline.Run): options, model, attention, speed options in
    effect, versions."""
    options, sampling, family = run.options, run.options.sampling, run.family
    width, height = run.size
    return {
        "prompt": item.prompt, "negative_prompt": sampling.negative_prompt, "seed": item.seed, "item": item.index,
        "family": family.name, "steps": sampling.steps, "guidance": sampling.guidance, "guidance_type": family.guidance,
        "width": width, "height": height,
        "scheduler": sampling.scheduler, "sampler": run.sampler, "model": run.model_name,
        "backend": options.attention.backend, "fallback": options.attention.fallback,
        "quantized": options.attention.quantized, "attention": attention_summary(run.router),
        "loras": lora.keys(sampling.loras) or [],
        "speed": run.speed,
        "dtype": run.dtype, "vae_dtype": run.vae_dtype, "device": run.device,
        "gpu": run.machine.gpu_label, "batch_size": options.work.batch_size,
        "settings": pixel_settings(options),
        "versions": {"sdcli": __version__, **{k: v.get("version") for k, v in run.report.get("packages", {}).items()
                                              if v.get("version")}},
    }


def a1111_parameters(r: dict) -> str:
    """The `parameters` text chunk as A1111 writes it, which its readers (and CivitAI, ComfyUI...) parse."""
    loras = r.get("loras") or []
    # A1111 users write a LoRA into the prompt as <lora:name:scale>, and A1111 adds its hash: readers find both
    lines = [" ".join([r["prompt"], *(f"<lora:{x['name']}:{x['scale']:g}>" for x in loras)])]
    if r.get("negative_prompt"):
        lines.append(f"Negative prompt: {r['negative_prompt']}")
    # Flux's guidance is an input of the model, not CFG: Forge writes it as "Distilled CFG Scale", CFG off at 1
    guidance = ({"CFG scale": 1, "Distilled CFG Scale": r["guidance"]} if r.get("guidance_type") == "distilled"
                else {"CFG scale": r["guidance"]})
    fields = {"Steps": r["steps"], "Sampler": r["sampler"], **guidance, "Seed": r["seed"],
              "Size": f"{r['width']}x{r['height']}", "Model": r["model"], "Backend": r["backend"],
              "Attention": r["attention"], "Dtype": r["dtype"],
              "Lora hashes": ", ".join(f"{x['name']}: {x['hash']}" for x in loras), "Version": f"sdcli {__version__}"}
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_parameters(path: Path) -> dict:
    """Parse an image's `parameters` chunk back: prompt, negative prompt and every `Key: value`."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
    if text is None:
        raise SdcliError(f"{path} has no generation parameters")
    *head, last = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative) or None}
    for key, value in PARAM_RE.findall(last):
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def read_recipe(path: Path) -> dict:
    """The full JSON recipe sdcli stores next to `parameters`."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["sdcli"])


def save_png(image, folder: Path, stem: str, data: dict) -> Path:
    """An image with its recipe, written under a new name (see write_new)."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(data))
    info.add_text("sdcli", json.dumps(data, ensure_ascii=False))
    pixels = (np.nan_to_num(image, nan=0.0) * 255).round().astype("uint8")
    return write_new(folder, stem, ".png", lambda path: Image.fromarray(pixels).save(path, format="PNG", pnginfo=info))


def check_writable(folder: Path) -> None:
    """Can images be written to `folder`? Tried with a trial file; folders made for it are removed again,
    so a run that fails before its first image leaves no empty folder behind (writers make it: images.write_new)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        trial = folder / f".sdcli-write-test-{os.getpid()}-{secrets.token_hex(4)}"  # pids repeat across nodes
        trial.write_bytes(b"")
        trial.unlink()
    except OSError as exc:
        raise SdcliError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    finally:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty after all (another process writes there too): it stays
                break


def write_new(folder: Path, stem: str, suffix: str, write) -> Path:
    """Write atomically under `stem+suffix`, or `stem-1+suffix`, ... if taken: never overwrite, never half-write.
    `write(path)` writes the content to a temporary path, which is then linked into place. The folder is made
    here, at the first file: a run that fails before it leaves no empty folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.partial{suffix}"
    write(tmp)
    try:
        for n in range(10_000):
            target = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, target)  # fails if target exists: atomic no-overwrite
                return target
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: reserve the name, then replace it atomically
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(tmp, target)
                return target
        raise SdcliError(f"too many files named {stem}*{suffix} in {folder}")
    finally:
        if tmp.exists():
            tmp.unlink()
