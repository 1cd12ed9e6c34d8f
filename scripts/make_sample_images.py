"""Draw the sample images in data/images/ and their README, deterministically.

    python scripts/make_sample_images.py

Scenes from the kit's demo domain: shapes {circle, square, triangle} in colours
{red, green, blue, yellow} on a plain or lightly textured background. Boxes are
(x0, y0, x1, y1) in pixels of the upright image, x1 and y1 exclusive: the shape
touches columns x0 .. x1 - 1 and rows y0 .. y1 - 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

OUT = Path(__file__).resolve().parents[1] / "data" / "images"

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 40),
}
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF value: the stored pixels must be turned 90 degrees clockwise


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, fill) -> None:
    x0, y0, x1, y1 = box
    corners = [x0, y0, x1 - 1, y1 - 1]  # PIL boxes include their last pixel
    if shape == "circle":
        draw.ellipse(corners, fill=fill)
    elif shape == "square":
        draw.rectangle(corners, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def textured_background(width: int, height: int) -> Image.Image:
    """A soft diagonal gradient with faint stripes (compresses well as PNG)."""
    y, x = np.mgrid[0:height, 0:width]
    level = 225 + 20 * (x + y) / (width + height) + 4 * ((x // 8 + y // 8) % 2)
    tint = np.stack([level, level - 8, level - 22], axis=-1)
    return Image.fromarray(tint.clip(0, 255).astype(np.uint8))


def scene(background: Image.Image, objects: list[tuple[str, str, tuple]]) -> Image.Image:
    image = background.copy()
    draw = ImageDraw.Draw(image)
    for colour, shape, box in objects:
        draw_shape(draw, shape, box, COLOURS[colour])
    return image


SCENES = [
    {
        "file": "shapes_0.png",
        "about": "320x240 RGB PNG, plain light-grey background",
        "background": lambda: Image.new("RGB", (320, 240), (235, 235, 235)),
        "objects": [
            ("red", "circle", (30, 40, 110, 120)),
            ("blue", "square", (170, 30, 250, 110)),
            ("yellow", "triangle", (110, 140, 210, 220)),
        ],
    },
    {
        "file": "shapes_1.png",
        "about": "256x256 RGB PNG, lightly textured beige background",
        "background": lambda: textured_background(256, 256),
        "objects": [
            ("green", "triangle", (20, 20, 100, 90)),
            ("red", "square", (150, 30, 220, 100)),
            ("blue", "circle", (40, 150, 110, 220)),
            ("yellow", "circle", (160, 160, 230, 230)),
        ],
    },
    {
        "file": "shapes_2_exif.jpg",
        "about": (
            "240x320 (portrait) RGB JPEG, stored as 320x240 pixels with EXIF "
            "Orientation = 6 (rotate 90 degrees clockwise to display); boxes are in "
            "the upright image that pk.images.load_image returns"
        ),
        "background": lambda: Image.new("RGB", (240, 320), (225, 235, 245)),
        "objects": [
            ("green", "circle", (60, 30, 180, 150)),
            ("yellow", "square", (30, 200, 110, 280)),
            ("red", "triangle", (140, 190, 220, 290)),
        ],
        "exif_rotated": True,
    },
    {
        "file": "shapes_3_gray.png",
        "about": "224x224 grayscale (mode L) PNG, white background, shapes in grey levels",
        "background": lambda: Image.new("RGB", (224, 224), (255, 255, 255)),
        "objects": [
            ("blue", "square", (20, 20, 90, 90)),
            ("red", "circle", (120, 30, 200, 110)),
            ("yellow", "triangle", (60, 120, 170, 210)),
        ],
        "gray": True,
    },
]


def save(spec: dict) -> Image.Image:
    image = scene(spec["background"](), spec["objects"])
    path = OUT / spec["file"]
    if spec.get("gray"):
        image = image.convert("L")
    if spec.get("exif_rotated"):
        stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATE_90_CW
        stored.save(path, quality=92, exif=exif.tobytes())
    else:
        image.save(path, optimize=True)
    return image


def describe(colour: str, gray: bool) -> str:
    if not gray:
        return colour
    level = Image.new("RGB", (1, 1), COLOURS[colour]).convert("L").getpixel((0, 0))
    return f"grey-{level} (from {colour})"


def readme_line(spec: dict) -> str:
    objects = "; ".join(
        f"{describe(colour, spec.get('gray', False))} {shape} {box}"
        for colour, shape, box in spec["objects"]
    )
    return f"- `{spec['file']}`: {spec['about']}. Objects (x0, y0, x1, y1): {objects}."


def check(spec: dict, drawn: Image.Image) -> None:
    """The file on disk, turned upright, shows the drawn scene."""
    with Image.open(OUT / spec["file"]) as stored:
        upright = ImageOps.exif_transpose(stored)
        assert upright.size == drawn.size, (spec["file"], upright.size, drawn.size)
        error = np.abs(np.asarray(upright, np.int16) - np.asarray(drawn, np.int16)).mean()
        assert error < 3, (spec["file"], error)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sample images",
        "",
        "Drawn by `scripts/make_sample_images.py` (deterministic; rerun it to remake them).",
        "Boxes are (x0, y0, x1, y1) in pixels of the upright image, x1 and y1 exclusive;",
        "a triangle's box is its bounding box (apex at the top centre).",
        "",
    ]
    for spec in SCENES:
        drawn = save(spec)
        check(spec, drawn)
        lines.append(readme_line(spec))
        size_kb = (OUT / spec["file"]).stat().st_size / 1024
        print(f"{spec['file']}: {size_kb:.1f} KB")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
