"""The demo's world: one coloured shape on a coloured background, the captions that describe it, and a scorer
that checks an image against its caption with plain image statistics.

A scene has five attributes, each named in its caption:

    "a small red circle in the top left on a blue background"
       size  colour shape  position              background

    size ∈ {small, large}, colour and background ∈ PALETTE (different), shape ∈ {circle, square, triangle},
    position ∈ {top left, top right, bottom left, bottom right, center}.

Drawing is deterministic from a seed. The background is a vertical gradient (brighter at the top), so the
GLCM score of an image (metrics.py, Eq. 11) is not trivially that of a flat canvas. The scorer reads an image,
drawn or generated (blurred by the autoencoder), back into the same five attributes:
- background: the median colour of the left and right border columns, the gradient undone, the nearest
  palette colour;
- the shape's colour: the median of its core, the pixels at least 3/4 as far from the background as the
  farthest one (away from a blurred edge), the nearest palette colour;
- the shape itself: the pixels past the half-way point from the background to that colour, the largest
  connected piece; a blurred step edge stays at the half-way contour, so its size does not grow with blur;
- position: the anchor nearest its centroid; size: half its bounding box's width against the midpoint
  of the two sizes' radii; shape: a triangle (pointing up) if the upper half of its bounding box holds less
  than 2/3 of what the lower half holds (triangle 1/3, circle and square 1; blur rounds the corners, but a
  triangle stays bottom-heavy), else a square or a circle by how much of its bounding box it fills (1 or π/4).

    python demo/shapes.py make --out data/ --count 4000 --heldout eval/ --heldout-count 100
    python demo/shapes.py score gen/ --prompts eval/metadata.jsonl
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics  # noqa: E402
import vae  # noqa: E402

PALETTE = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 75, 210), "yellow": (240, 210, 40),
           "purple": (135, 55, 175), "orange": (245, 135, 30), "white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
ANCHORS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
           "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}  # (x, y) as fractions of the side
RADII = {"small": (0.14, 0.17), "large": (0.24, 0.28)}  # half the shape's width, as a fraction of the side
GRADIENT = 0.12  # the background is ×(1 + 0.12) at the top, ×(1 − 0.12) at the bottom
ATTRIBUTES = ("size", "colour", "shape", "position", "background")


def caption(scene: dict) -> str:
    where = "in the center" if scene["position"] == "center" else f"in the {scene['position']}"
    article = "an" if scene["background"][0] in "aeiou" else "a"
    return f"a {scene['size']} {scene['colour']} {scene['shape']} {where} on {article} {scene['background']} background"


def parse(text: str) -> dict:
    """The attributes a caption names (the inverse of `caption`); a caption of another form is an error."""
    words = text.split()
    position = " ".join(words[5:-4]).removeprefix("the ")
    scene = {"size": words[1], "colour": words[2], "shape": words[3], "position": position,
             "background": words[-2]} if len(words) >= 9 else {}
    known = {"size": RADII, "colour": PALETTE, "shape": SHAPES, "position": ANCHORS, "background": PALETTE}
    if not scene or caption(scene) != text or any(scene[k] not in known[k] for k in known):
        raise ValueError(f"not a caption of the demo's world: {text!r}")
    return scene


def random_scene(rng: random.Random) -> dict:
    colour, background = rng.sample(sorted(PALETTE), 2)
    return {"size": rng.choice(sorted(RADII)), "colour": colour, "shape": rng.choice(SHAPES),
            "position": rng.choice(sorted(ANCHORS)), "background": background}


def draw(scene: dict, size: int, rng: random.Random) -> Image.Image:
    """The scene at size×size pixels; `rng` places it (a jitter of ±4% of the side) and sizes it."""
    ramp = 1 + GRADIENT * np.linspace(1, -1, size)[:, None, None]  # (size, 1, 1), brighter at the top
    canvas = np.clip(np.array(PALETTE[scene["background"]], dtype=np.float64) * ramp, 0, 255)
    image = Image.fromarray(np.broadcast_to(canvas, (size, size, 3)).round().astype(np.uint8))
    r = rng.uniform(*RADII[scene["size"]]) * size
    cx, cy = ((a + rng.uniform(-0.04, 0.04)) * size for a in ANCHORS[scene["position"]])
    cx, cy = min(max(cx, r + 1), size - r - 1), min(max(cy, r + 1), size - r - 1)  # keep it whole
    pen, fill = ImageDraw.Draw(image), PALETTE[scene["colour"]]
    if scene["shape"] == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene["shape"] == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # pointing up, as wide as it is high
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def make(out: Path, count: int, size: int, seed: int, exclude: set[str] = frozenset(), distinct=False) -> list[str]:
    """`count` scenes as out/NNNNN.png + out/metadata.jsonl, deterministic from `seed`; captions in `exclude`
    (and with `distinct`, those already drawn) are drawn again: the held-out prompts are all different, and
    never appear in the training set. Returns the captions."""
    out.mkdir(parents=True, exist_ok=True)
    rng, rows, exclude = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        scene = random_scene(rng)
        if (text := caption(scene)) in exclude:
            continue
        if distinct:
            exclude.add(text)
        name = f"{len(rows):05d}.png"
        draw(scene, size, rng).save(out / name, optimize=False, compress_level=6)
        rows.append({"file_name": name, "text": text})
    vae.atomic_write(out / "metadata.jsonl",
                     lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return [r["text"] for r in rows]


# ---------------------------------------------------------------------------------------------------------
# The scorer


def nearest(rgb, palette=PALETTE) -> str:
    return min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, palette[name])))


def read_scene(image: np.ndarray) -> dict:
    """The five attributes of an H×W×3 uint8 image, by the statistics of the module docstring."""
    h, w, _ = image.shape
    px = image.astype(np.float64)
    ramp = 1 + GRADIENT * np.linspace(1, -1, h)[:, None, None]  # (h, 1, 1)
    flat = px / ramp  # the gradient undone
    border = np.concatenate([flat[:, :2], flat[:, -2:]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)  # the background's colour
    expected = bg * ramp  # (h, 1, 3): the background as drawn, row by row
    distance = np.linalg.norm(px - expected, axis=-1)
    none = {"size": None, "colour": None, "shape": None, "position": None, "background": nearest(bg)}
    if distance.max() < 60:  # no shape at all
        return none
    fg = np.median(px[distance >= 0.75 * distance.max()], axis=0)  # the shape's core, away from a blurred edge
    # The half-way contour between background and shape: where a step edge stays however much it is blurred.
    axis = fg - expected
    mask = ((px - expected) * axis).sum(-1) > 0.5 * (axis * axis).sum(-1)
    labels, count = ndimage.label(mask)
    if count > 1:  # the largest piece: specks elsewhere are not the shape
        mask = labels == 1 + np.argmax(ndimage.sum(mask, labels, range(1, count + 1)))
    ys, xs = np.nonzero(mask)
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = mask.sum() / (box_w * box_h)
    middle = (ys.min() + ys.max()) / 2
    top_heavy = (ys < middle).sum() / max((ys > middle).sum(), 1)  # upper half over lower half
    radius = max(box_w / w, box_h / h) / 2  # the drawn radius, whatever the shape
    return {**none, "size": "large" if radius > (RADII["small"][1] + RADII["large"][0]) / 2 else "small",
            "colour": nearest(fg), "shape": "triangle" if top_heavy < 2 / 3 else "square" if fill > 0.87 else "circle",
            "position": min(ANCHORS, key=lambda a: (ANCHORS[a][0] - xs.mean() / w) ** 2 +
                            (ANCHORS[a][1] - ys.mean() / h) ** 2)}


def score(images: dict[str, np.ndarray], captions: dict[str, str]) -> dict:
    """For each image name: which caption attributes the image meets; and the accuracy per attribute and in all."""
    per_image, hits = {}, {a: 0 for a in ATTRIBUTES}
    for name, text in captions.items():
        want, got = parse(text), read_scene(images[name])
        per_image[name] = {a: {"want": want[a], "got": got[a]} for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += want[a] == got[a]
    n = len(captions)
    accuracy = {a: hits[a] / n for a in ATTRIBUTES}
    return {"images": per_image, "accuracy": accuracy, "all": sum(hits.values()) / (n * len(ATTRIBUTES))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The demo's data set of captioned shapes, and its caption scorer.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="draw a training set (and a held-out set whose captions it never shows)")
    m.add_argument("--out", required=True, help="folder for NNNNN.png + metadata.jsonl")
    m.add_argument("--count", type=int, default=4000)
    m.add_argument("--heldout", help="folder for the held-out images and prompts")
    m.add_argument("--heldout-count", type=int, default=100)
    m.add_argument("--size", type=int, default=256, help="pixels per side")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="check generated images against their captions")
    s.add_argument("images", help="folder of images named as the prompts' file_name (any image extension)")
    s.add_argument("--prompts", required=True, help="the metadata.jsonl the images were generated from")
    s.add_argument("--json", help="also write the per-image results here")
    a = p.parse_args(argv)
    try:
        if a.command == "make":
            for name in ("count", "heldout_count", "size"):
                if getattr(a, name) < 1:
                    raise vae.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
            heldout = set()
            if a.heldout:  # its own seed stream, so the training set does not depend on --heldout-count
                heldout = set(make(Path(a.heldout), a.heldout_count, a.size, a.seed + 1_000_003, distinct=True))
            texts = make(Path(a.out), a.count, a.size, a.seed, exclude=heldout)
            print(f"{len(texts)} images in {a.out} ({len(set(texts))} distinct captions)"
                  + (f"; {len(heldout)} held-out captions in {a.heldout}" if a.heldout else ""))
            return 0
        prompts = metrics.read_prompts(a.prompts)
        folder, images, captions = Path(a.images), {}, {}
        for text, stem in prompts:
            found = [f for f in folder.glob(f"{stem}.*") if f.suffix.lower() in metrics.IMAGE_SUFFIXES]
            if not found:
                raise vae.UserError(f"{folder}: no image for {stem} ({text!r})")
            images[str(stem)] = metrics.load_image(found[0])
            captions[str(stem)] = text
        result = score(images, captions)
    except (vae.UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        vae.write_json(Path(a.json), result)
    print(" ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items()) + f" | all {result['all']:.1%} "
          f"of {len(captions)} images × {len(ATTRIBUTES)} attributes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
