"""Where the kit's assets are: the demo model, its tokenizer and VAE, the sample images.

    import pali_kit as pk
    pk.asset_dir()       # Path of the folder: demo_model.npz, vae.npz, tokenizer.model, images/
    pk.sample_images()   # {"shapes_0.png": Path(...), ...}

The files live in the repository's top-level ``data/`` folder. A wheel or an
sdist (``pip install .``, ``pip install git+URL``) installs them inside the
package as ``pali_kit/_assets/`` (``pyproject.toml`` maps that package onto
``data/``, so the repository keeps one copy); a source checkout or an editable
install reads ``data/`` directly. ``$PALI_KIT_DATA`` overrides both.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# Files every install carries (the demo tokenizer is the one without which nothing runs).
MARKER = "tokenizer.model"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


def asset_dir() -> Path:
    """The folder that holds the kit's assets.

    In this order: ``$PALI_KIT_DATA`` if set; ``pali_kit/_assets`` inside an
    installed wheel; the ``data/`` folder of a source checkout. Holds
    ``demo_model.npz`` (the demo model), ``vae.npz`` (the demo mask VQ-VAE),
    ``tokenizer.model`` (the demo tokenizer), ``images/`` (sample images) and
    ``sample_dataset/``.
    """
    env = os.environ.get("PALI_KIT_DATA")
    if env:
        return Path(env)
    package = Path(str(resources.files(__package__)))
    installed = package / "_assets"
    if (installed / MARKER).is_file():
        return installed
    checkout = package.parent / "data"
    if (checkout / MARKER).is_file():
        return checkout
    raise FileNotFoundError(
        f"the kit's assets are neither in {installed} nor in {checkout}: reinstall the kit "
        "(`pip install --force-reinstall pali_kit`, or `pip install .` from a clone), or set "
        "PALI_KIT_DATA to a folder that holds tokenizer.model, demo_model.npz and vae.npz"
    )


def sample_images() -> dict[str, Path]:
    """The kit's sample images, ``{file name: path}`` sorted by name.

    Synthetic scenes of circles, squares and triangles that the demo model
    knows (``shapes_0.png``, ...), including an EXIF-rotated JPEG and a
    greyscale PNG; any of them can be passed to ``pk.preprocess``,
    ``Model.generate`` and ``pk.viz``.
    """
    folder = asset_dir() / "images"
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {p.name: p for p in files}
