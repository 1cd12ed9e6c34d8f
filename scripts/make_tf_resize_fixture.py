"""Write tests/fixtures/tf_resize.npz: TensorFlow's antialiased bilinear resize, once.

Builds: no file in ``data/``; ``tests/fixtures/tf_resize.npz``. How long it takes
is not measured here: it needs TensorFlow, which the kit's environments do not
install. Deterministic: fixed inputs (``default_rng(0)``
and fixed arrays); the output depends on the TensorFlow version it records.

The reference PaliGemma colab resizes with
``tf.image.resize(image, (size, size), method="bilinear", antialias=True)`` and keeps
the result as float. pali_kit reimplements that resize in numpy; this script records
what TensorFlow itself returns on a few small deterministic inputs so that
tests/test_images.py can check the match without TensorFlow.

Needs TensorFlow, which is NOT a dependency of pali_kit or its tests, so it is not run
in CI. Run it by hand in a throwaway virtualenv outside the repository:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu numpy pillow
    /tmp/tfenv/bin/python scripts/make_tf_resize_fixture.py

Layout of the .npz, for each case NAME:
    NAME/input   uint8 or float32 [H, W, 3], pixel values on the [0, 255] scale
    NAME/size    int32 [2], the (h, w) asked of tf.image.resize
    NAME/rows    int32 [R], the output rows stored: all of them for small outputs,
                 every 5th (and the last) for big ones, to keep the file small
    NAME/output  float32 [R, w, 3], TF's output at those rows, on the [0, 255] scale
plus ``tf_version``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tf_resize.npz"


def scene(height: int = 200, width: int = 300) -> np.ndarray:
    """A natural-looking synthetic picture: gradients, shapes, thin stripes. uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 140 + 60 * y / height, 230 - 30 * x / width], -1)
    img = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, 150), (80, 60), (170, 150)], fill=(70, 90, 80))  # mountains
    draw.polygon([(120, 150), (210, 80), (300, 150)], fill=(100, 110, 95))
    draw.rectangle([0, 150, width, height], fill=(60, 140, 60))  # grass
    draw.ellipse([230, 15, 275, 60], fill=(250, 220, 60))  # sun
    draw.rectangle([30, 120, 90, 185], fill=(180, 40, 40))  # a red house
    draw.polygon([(25, 120), (60, 95), (95, 120)], fill=(120, 30, 30))
    for i in range(0, 60, 2):  # a fence of one-pixel stripes: hard to resize without aliasing
        draw.line([(150 + i, 160), (150 + i, 195)], fill=(240, 240, 240))
    draw.line([(0, height - 1), (width - 1, 0)], fill=(20, 20, 20), width=1)
    return np.asarray(img)


def tf_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = tf.image.resize(tf.constant(image), size, method="bilinear", antialias=True)
    return out.numpy().astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    random_float = (rng.random((37, 53, 3)) * 255).astype(np.float32)  # not whole numbers
    picture = scene()
    cases = {
        "random_37x53_to_16": (random_float, (16, 16)),
        "random_37x53_to_64": (random_float, (64, 64)),
        "random_37x53_to_20x90": (random_float, (20, 90)),  # down in y, up in x
        "scene_200x300_to_28": (picture, (28, 28)),
        "scene_200x300_to_224": (picture, (224, 224)),  # up in y, down in x
        "column_53x1_to_16": (picture[:53, 100:101], (16, 16)),
        "row_1x53_to_16": (picture[100:101, :53], (16, 16)),
        "tiny_2x3_to_16": (picture[140:142, 28:31], (16, 16)),
    }
    arrays: dict[str, np.ndarray] = {"tf_version": np.array(tf.__version__)}
    for name, (image, size) in cases.items():
        output = tf_resize(image, size)
        rows = np.arange(size[0]) if size[0] <= 64 else np.r_[0 : size[0] : 5, size[0] - 1]
        arrays[f"{name}/input"] = image
        arrays[f"{name}/output"] = output[rows]
        arrays[f"{name}/size"] = np.array(size, np.int32)
        arrays[f"{name}/rows"] = rows.astype(np.int32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB) with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
