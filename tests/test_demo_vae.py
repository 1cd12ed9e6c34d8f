"""The demo mask VQ-VAE shipped as data/vae.npz (trained by scripts/train_demo_vae.py).

It must have exactly the keys and PyTorch layouts of big_vision's vae-oid.npz,
load through ``pk.load_vae("demo")``, and turn the masks of the demo shapes into
16 codes that decode back to the same masks.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import pali_kit as pk
from pali_kit import data as pdata
from pali_kit.segmentation import (
    crop_and_resize,
    encode_masks,
    paste_binary_mask,
    reconstruct_masks,
)

REPO = Path(__file__).resolve().parent.parent

# Measured by scripts/train_demo_vae.py on 500 held-out objects: mean IoU 0.995
# (circle), 1.0 (square), 0.998 (triangle); on the 20 objects here 0.994, 1.0,
# 1.0, the worst 0.993 (see data/README.md). A broken file or a changed mapping
# gives far less (reading the 16 codes in reverse: triangles 0.34).
MIN_MEAN_IOU = 0.97
MIN_IOU = 0.93


def _vae_shapes(codebook_dim: int) -> dict:
    spec = importlib.util.spec_from_file_location(
        "make_random_vae", REPO / "scripts/make_random_vae.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vae_shapes(codebook_dim)


@pytest.fixture(scope="module")
def arrays():
    with np.load(pk.asset_dir() / "vae.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def vae():
    return pk.load_vae("demo")


def test_official_layout(arrays, vae):
    dim = arrays["_vq_vae._embedding"].shape[1]
    expected = _vae_shapes(dim)
    assert sorted(arrays) == sorted(expected)
    for name, shape in expected.items():
        assert arrays[name].shape == shape, name
        assert arrays[name].dtype in (np.float16, np.float32), name
        assert np.all(np.isfinite(arrays[name])), name
    assert vae.num_codes == 128 and vae.codebook_dim == dim and vae.has_encoder


def _held_out_objects(num: int = 20, seed: int = 3000, size: int = 64, max_boxes: int = 6):
    """Objects of scenes of a seed the training never saw, at the demo model's image size.

    At most ``max_boxes`` distinct box sizes: crop_and_resize compiles once per
    crop size, which would make the test slow.
    """
    objects, boxes, index = [], set(), 0
    while len(objects) < num:
        for obj in pdata.make_scene(seed, index, size).objects:
            box = (obj.box[2] - obj.box[0], obj.box[3] - obj.box[1])
            if box in boxes or len(boxes) < max_boxes:
                boxes.add(box)
                objects.append(obj)
        index += 1
    return objects[:num]


def test_shapes_round_trip(vae):
    size = 64
    objects = _held_out_objects(size=size)
    crops = np.stack([crop_and_resize(o.mask, o.box) for o in objects])  # as mask_to_codes
    codes = encode_masks(vae, crops)
    assert codes.shape == (len(objects), 16) and codes.min() >= 0 and codes.max() < 128
    recon = reconstruct_masks(vae, codes)
    assert np.abs(recon).max() < 3.0  # logit-like, about [-1, 1] as vae-oid's decoder
    ious = {}
    for obj, rec in zip(objects, recon):
        pasted = paste_binary_mask(rec, obj.box, size, size)
        iou = np.sum(pasted & obj.mask) / np.sum(pasted | obj.mask)
        ious.setdefault(obj.label, []).append(iou)
    assert set(ious) == set(pdata.SHAPES)
    means = {label: float(np.mean(v)) for label, v in ious.items()}
    assert min(means.values()) > MIN_MEAN_IOU, means
    assert min(min(v) for v in ious.values()) > MIN_IOU, ious
