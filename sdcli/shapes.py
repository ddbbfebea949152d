"""The built-in `shapes` model's world: the pictures it was trained on, their captions, and how to read a picture back.

`shapes` is a small Stable Diffusion 1.x pipeline that sdcli trains itself (scripts/train_shapes.py) on pictures
drawn here: one flat-coloured shape on a flat-coloured background, 64×64, captioned like "a red circle on a blue
background", optionally with a size ("a small ...", "a big ...") and a position ("... at the left ..."). Its
weights ship inside the package (sdcli/weights/shapes). `colours` reads a picture back: the background's colour
and the shape's, by simple pixel statistics, so a test (and the training script) can tell whether a picture shows
what its prompt asks for.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

FOLDER = Path(__file__).with_name("weights") / "shapes"
SIZE = 64  # pixels, square

# sRGB, far apart from each other so that a picture's colours are named without doubt
COLOURS = {"red": (225, 35, 35), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
           "blue": (40, 70, 215), "purple": (140, 55, 185), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (6.0, 8.5), "big": (12.0, 15.0)}  # radius in pixels, drawn uniformly in this range
POSITIONS = {"at the left": (0.3, 0.5), "at the right": (0.7, 0.5), "at the top": (0.5, 0.3),
             "at the bottom": (0.5, 0.7), "in the middle": (0.5, 0.5)}  # centre, as a fraction of the side
JITTER = 0.05  # each centre moves by up to this fraction of the side
WORDS = sorted({w for phrase in [*COLOURS, *SHAPES, *SIZES, *POSITIONS, "a an on background"] for w in phrase.split()})

CAPTION = re.compile(rf"^an? (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{'|'.join(COLOURS)}) "
                     rf"(?P<shape>{'|'.join(SHAPES)})(?: (?P<position>{'|'.join(POSITIONS)}))? "
                     rf"on an? (?P<background>{'|'.join(COLOURS)}) background$")


def caption(colour: str, shape: str, background: str, size: str | None = None, position: str | None = None) -> str:
    """'a small red circle at the left on a blue background'; size and position are optional."""
    def article(word):
        return "an" if word[0] in "aeiou" else "a"

    words = [article(size or colour), size, colour, shape, position, "on", article(background), background,
             "background"]
    return " ".join(w for w in words if w)


# the prompts the model is judged on (scripts/train_shapes.py, tests/test_shapes.py): every colour as shape and as
# background, every shape
EXAMPLES = [caption(c, s, b) for c, s, b in [
    ("red", "circle", "blue"), ("blue", "square", "yellow"), ("green", "triangle", "white"),
    ("yellow", "circle", "purple"), ("white", "square", "black"), ("black", "triangle", "orange"),
    ("purple", "circle", "green"), ("orange", "square", "red")]]


def parse(prompt: str) -> dict | None:
    """A caption's parts (colour, shape, background, size, position), or None for a prompt outside the vocabulary."""
    match = CAPTION.match(" ".join(prompt.lower().split()))
    return match.groupdict() if match else None


def sample(rng: random.Random) -> dict:
    """One random scene: every attribute drawn, the shape's colour different from the background's."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    return {"colour": colour, "shape": rng.choice(SHAPES), "background": background,
            "size": rng.choice(sorted(SIZES)), "position": rng.choice(sorted(POSITIONS))}


def coverage(shape: str, radius: float, cx: float, cy: float):
    """How much of each pixel (SIZE × SIZE, 0 to 1) a shape centred at (cx, cy) pixels covers: its signed distance
    to the edge, clamped, which antialiases the edge."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        distance = (dx ** 2 + dy ** 2).sqrt() - radius
    elif shape == "square":  # the same area as the circle
        distance = torch.maximum(dx.abs(), dy.abs()) - radius * 0.886
    else:  # an upright equilateral triangle of the same area, its height centred
        corner = radius * 1.55  # centroid to corner
        dy = dy - corner / 4
        distance = torch.maximum(dx.abs() * 0.866 - dy * 0.5, dy) - corner / 2
    return (0.5 - distance).clamp(0, 1)


def rgb(colour: str):
    """A palette colour as a (3, 1, 1) tensor in [-1, 1], the range the VAE works in."""
    import torch

    return torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None] / 127.5 - 1


def draw(scenes: list[dict], rng: random.Random):
    """Pictures of `scenes` as a float tensor (N, 3, SIZE, SIZE) in [-1, 1]. A scene without size or position
    gets a random one (as its caption says nothing); every centre moves by up to JITTER."""
    import torch

    pictures = []
    for scene in scenes:
        radius = rng.uniform(*SIZES[scene.get("size") or rng.choice(sorted(SIZES))])
        cx, cy = POSITIONS[scene.get("position") or rng.choice(sorted(POSITIONS))]
        inside = coverage(scene["shape"], radius, *((c + rng.uniform(-JITTER, JITTER)) * SIZE for c in (cx, cy)))
        pictures.append(inside * rgb(scene["colour"]) + (1 - inside) * rgb(scene["background"]))
    return torch.stack(pictures)


def nearest_colour(rgb) -> str:
    """The name of the palette colour nearest to `rgb` (0-255)."""
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def colours(image) -> dict:
    """What a picture shows, by pixel statistics. The background: the median colour of a frame 2 to 5 pixels in from
    the edge (a VAE's outermost pixels stray). The shape: the pixels at least 3/4 as far (Euclidean in RGB) from
    the background as the farthest one, so the blend at its edge doesn't count, and their median colour. `image`:
    an (H, W, 3) array, uint8 or float in [0, 1]. Returns both colours as RGB and as the nearest palette name, and
    the shape's share of the picture: pixels at least half as far, and at least 40 of 255, from the background."""
    import numpy as np

    pixels = np.asarray(image)
    pixels = pixels * 255.0 if np.issubdtype(pixels.dtype, np.floating) else pixels.astype(np.float64)
    frame = np.ones(pixels.shape[:2], bool)
    frame[:2, :] = frame[-2:, :] = frame[:, :2] = frame[:, -2:] = False
    frame[6:-6, 6:-6] = False
    background = np.median(pixels[frame], axis=0)
    distance = np.linalg.norm(pixels - background, axis=2)
    far = distance.max()
    shape = np.median(pixels[distance >= 0.75 * far], axis=0)
    share = float((distance >= max(0.5 * far, 40)).mean())
    return {"background": nearest_colour(background), "background_rgb": background.round().tolist(),
            "shape": nearest_colour(shape), "shape_rgb": shape.round().tolist(), "shape_share": share}


def matches(image, prompt: str, min_share: float = 0.02) -> bool:
    """Whether the picture's shape and background have the colours `prompt` names (and the shape covers at least
    `min_share` of it)."""
    want, seen = parse(prompt), colours(image)
    return (want is not None and seen["background"] == want["background"] and seen["shape"] == want["colour"]
            and seen["shape_share"] >= min_share)


def load():
    """The trained pipeline, from the weights inside the package (no download)."""
    from diffusers import StableDiffusionPipeline

    from sdcli.errors import SdcliError, error_line

    try:
        return StableDiffusionPipeline.from_pretrained(str(FOLDER), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise SdcliError(f"the shapes model's weights in {FOLDER} can't be loaded ({error_line(exc)}): reinstall "
                         "sdcli, or train them again with scripts/train_shapes.py") from None
