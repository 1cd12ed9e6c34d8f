"""Draw the sample images in data/images/, their ground truth and README, deterministically.

Builds: ``data/images/`` (the four ``shapes_*`` images, ``ground_truth.json``,
``README.md``). Takes about 1 s. Deterministic: scene seed 4242, fixed noise
seeds; rerunning rewrites the same bytes (``git status data/`` stays clean).

    python scripts/make_sample_images.py

Three images come from the demo model's own world (``pali_kit.data.make_scene``
at 256 px: plain grey background, a circle, a square and a triangle in the four
colours), so the demo model answers them correctly: they are the first thing a
user sees (``pali-kit demo``, chapter 1, the prompt panel). ``tests/test_demo_model.py``
checks its answers against ``ground_truth.json``. The scene indices below were
picked once among held-out scenes (seed 4242) as ones the model gets right; a
retrained model may need others. One of them is stored as a JPEG with an EXIF
rotation (the loader turns it upright). The fourth image, ``shapes_3_gray.png``,
is deliberately out of the model's world: a grayscale, photo-like picture
(shading, soft shadows, a tilted square, texture and noise), the lesson of what
a 1.5 M-parameter model trained on flat synthetic shapes cannot do.

Boxes are (x0, y0, x1, y1) in pixels of the upright image, x1 and y1 exclusive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pali_kit.atomic import atomic_write, write_text
from pali_kit.data import make_scene

OUT = Path(__file__).resolve().parents[1] / "data" / "images"
SEED, SIZE = 4242, 256  # held out: the demo model trained on seed 0
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF value: the stored pixels must be turned 90 degrees clockwise

IN_DOMAIN = [
    {"file": "shapes_0.png", "index": 0, "upright": (256, 256)},
    {"file": "shapes_1.png", "index": 10, "upright": (256, 256)},
    # a portrait photo: the scene stretched to 240x320 (the model squashes it back
    # to a square), stored as 320x240 pixels with EXIF Orientation = 6
    {"file": "shapes_2_exif.jpg", "index": 11, "upright": (240, 320), "exif_rotated": True},
]
OUT_OF_DOMAIN = "shapes_3_gray.png"


def in_domain(spec: dict) -> tuple[Image.Image, dict]:
    """The scene drawn at 256 px, resized to the upright size, and its ground truth."""
    scene = make_scene(SEED, spec["index"], SIZE, min_shapes=3)
    width, height = spec["upright"]
    image = Image.fromarray(scene.image)
    if (width, height) != (SIZE, SIZE):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    sx, sy = width / SIZE, height / SIZE
    objects = [
        {
            "label": o.label,
            "colour": o.colour,
            "box": [round(v * s) for v, s in zip(o.box, (sx, sy, sx, sy))],
        }
        for o in sorted(scene.objects, key=lambda o: o.box)  # left to right, as the caption
    ]
    about = f"make_scene({SEED}, {spec['index']}, {SIZE}, min_shapes=3)"
    if spec.get("exif_rotated"):
        about += f", stretched to {width}x{height}, JPEG stored on its side with EXIF Orientation 6"
    truth = {
        "in_domain": True,
        "about": about,
        "size": [width, height],
        "caption": scene.caption(),
        "count": len(scene.objects),
        "objects": objects,
    }
    return image, truth


def photo_like() -> tuple[Image.Image, dict]:
    """A grayscale 224 px 'photo' of three shapes: out of the demo model's world."""
    rng = np.random.default_rng(7)
    size = 224
    y, x = np.mgrid[0:size, 0:size] / size
    table = 150 + 60 * x - 30 * y + 10 * np.sin(40 * (x + 0.3 * y))  # lit wooden table
    canvas = Image.fromarray(table.clip(0, 255).astype(np.uint8)).convert("RGB")
    shadows = Image.new("L", (size, size), 0)
    shade = ImageDraw.Draw(shadows)
    shade.ellipse((38, 38, 108, 108), fill=110)
    shade.polygon([(150, 48), (206, 70), (184, 126), (128, 104)], fill=110)
    shade.polygon([(120, 132), (176, 212), (64, 212)], fill=110)
    shadows = shadows.filter(ImageFilter.GaussianBlur(6))
    dark = Image.new("RGB", (size, size), (40, 35, 30))
    canvas = Image.composite(dark, canvas, shadows)
    draw = ImageDraw.Draw(canvas)
    objects = [  # (label, colour painted, box, polygon or ellipse)
        ("circle", "red", (30, 30, 100, 100)),
        ("square", "blue", (120, 36, 200, 116)),
        ("triangle", "yellow", (56, 122, 168, 204)),
    ]
    draw.ellipse((30, 30, 99, 99), fill=(200, 50, 45))
    draw.ellipse((44, 40, 70, 62), fill=(235, 120, 110))  # a highlight
    draw.polygon([(142, 36), (200, 58), (178, 116), (120, 94)], fill=(45, 80, 200))  # tilted
    draw.polygon([(112, 122), (167, 203), (56, 203)], fill=(235, 200, 50))
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(canvas, np.float32) + rng.normal(0, 9, (size, size, 3))
    image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert("L")
    truth = {
        "in_domain": False,
        "about": (
            "a grayscale, photo-like picture (a textured, "
            "lit background, soft shadows, a highlight, a tilted square, blur and noise); "
            "the colours are those painted before the picture was turned grey"
        ),
        "size": [size, size],
        "caption": None,  # a caption of grey shapes is not in the model's vocabulary
        "count": len(objects),
        "objects": [{"label": lb, "colour": c, "box": list(b)} for lb, c, b in objects],
    }
    return image, truth


def save(image: Image.Image, name: str, exif_rotated: bool = False) -> None:
    path = OUT / name
    if exif_rotated:
        stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATE_90_CW
        with atomic_write(path) as f:
            stored.save(f, format="JPEG", quality=95, exif=exif.tobytes())
    else:
        with atomic_write(path) as f:
            image.save(f, format="PNG", optimize=True)
    with Image.open(path) as stored:  # the file, turned upright, shows the drawn picture
        upright = ImageOps.exif_transpose(stored)
        assert upright.size == image.size, (name, upright.size, image.size)
        error = np.abs(np.asarray(upright, np.int16) - np.asarray(image, np.int16)).mean()
        assert error < 3, (name, error)


def readme_line(name: str, truth: dict) -> str:
    objects = "; ".join(f"{o['colour']} {o['label']} {tuple(o['box'])}" for o in truth["objects"])
    kind = "in the demo's world" if truth["in_domain"] else "**out of the demo's world**"
    return (
        f"- `{name}` ({truth['size'][0]}x{truth['size'][1]}, {kind}): {truth['about']}. {objects}."
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    truths = {}
    for spec in IN_DOMAIN:
        image, truths[spec["file"]] = in_domain(spec)
        save(image, spec["file"], spec.get("exif_rotated", False))
    image, truths[OUT_OF_DOMAIN] = photo_like()
    save(image, OUT_OF_DOMAIN)
    write_text(OUT / "ground_truth.json", json.dumps(truths, indent=1) + "\n")
    lines = [
        "# Sample images",
        "",
        "Drawn by `scripts/make_sample_images.py` (deterministic; rerun it to remake them),",
        "with their ground truth in `ground_truth.json` (caption, count, and each object's",
        "label, colour and box). Boxes are (x0, y0, x1, y1) in pixels of the upright image,",
        "x1 and y1 exclusive. The first three are in the demo model's world and it answers",
        "them correctly (`tests/test_demo_model.py` checks it); the last is a lesson in",
        "what it cannot do.",
        "",
        *(readme_line(name, truth) for name, truth in truths.items()),
    ]
    write_text(OUT / "README.md", "\n".join(lines) + "\n")
    for name in truths:
        print(f"{name}: {(OUT / name).stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
