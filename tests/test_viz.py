"""Drawing boxes, masks and captions (pali_kit.viz), checked on the pixels."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pali_kit import viz
from pali_kit.assets import sample_images
from pali_kit.detection import Detection, parse_detections

REPO = Path(__file__).resolve().parent.parent
BACKGROUND = (40, 40, 40)


@pytest.fixture
def image():
    """A synthetic 160x120 sample: dark background, a light-grey square."""
    pixels = np.full((120, 160, 3), BACKGROUND, np.uint8)
    pixels[40:80, 60:100] = 200
    return PIL.Image.fromarray(pixels)


# ----------------------------------------------------------------------------- images in


def test_float_image_in_minus_one_one_maps_to_0_255():
    x = np.stack([np.full((4, 4), -1.0), np.zeros((4, 4)), np.ones((4, 4))], axis=-1)
    pixels = np.asarray(viz.to_pil(x[None].astype(np.float32)))  # with a batch axis
    assert pixels.shape == (4, 4, 3)
    np.testing.assert_array_equal(pixels[0, 0], [0, 128, 255])


def test_float_image_with_other_value_range():
    pixels = np.asarray(viz.to_pil(np.full((2, 2, 3), 0.5), value_range=(0, 1)))
    assert (pixels == 128).all()


def test_uint8_and_grayscale_arrays_become_rgb():
    assert viz.to_pil(np.zeros((5, 7), np.uint8)).mode == "RGB"
    assert viz.to_pil(np.zeros((5, 7, 1), np.uint8)).size == (7, 5)
    assert viz.to_pil(PIL.Image.new("L", (3, 3))).mode == "RGB"


@pytest.mark.parametrize("name", sorted(sample_images()))  # EXIF-rotated and grey ones too
def test_every_image_kind_preprocess_takes_is_drawn_as_the_model_sees_it(name):
    import io

    from pali_kit.images import load_image

    path = sample_images()[name]
    upright = load_image(path)  # what pk.preprocess reads: RGB, EXIF rotation applied
    kinds = {"str": lambda: str(path), "Path": lambda: path, "bytes": path.read_bytes,
             "file": lambda: io.BytesIO(path.read_bytes()), "PIL": lambda: PIL.Image.open(path),
             "array": lambda: upright}  # fmt: skip
    box = parse_detections("<loc0000><loc0000><loc0010><loc0010> c", 8, 8)
    for kind, make in kinds.items():
        drawn = viz.draw_detections(make(), box, show_masks=False)
        assert drawn.size == (upright.shape[1], upright.shape[0]), kind
        # the box and its label sit in the top-left corner; below them, the image untouched
        np.testing.assert_array_equal(np.asarray(drawn)[40:], upright[40:], err_msg=kind)
        assert viz.draw_caption(make(), "x").width == upright.shape[1], kind
    assert len(viz.show(str(path)).axes) == 1  # one path is one image, not a list of letters


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        viz.to_pil(np.zeros((2, 3, 5, 7)))


def test_label_colour_is_stable_across_processes():
    code = "from pali_kit.viz import label_color; print(*label_color('cat'))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert tuple(map(int, out.stdout.split())) == viz.label_color("cat")
    assert viz.label_color("cat") in viz.PALETTE


# ----------------------------------------------------------------------------- detections


def test_rendered_detection_has_the_label_colour_on_the_box_edge(image, tmp_path):
    det = Detection.from_box("cat", (50, 30, 110, 90), *image.size)
    out = viz.draw_detections(image, [det], line_width=2)
    out.save(tmp_path / "detection.png")
    pixels = np.asarray(out)
    color = viz.label_color("cat")
    assert tuple(pixels[60, 50]) == color  # left edge
    assert tuple(pixels[60, 109]) == color  # right edge (last pixel inside the box)
    assert tuple(pixels[89, 80]) == color  # bottom edge
    assert tuple(pixels[110, 150]) == BACKGROUND  # far outside: untouched
    assert tuple(pixels[60, 80]) == (200, 200, 200)  # inside: untouched (no mask)
    tag = pixels[:30, 50:110].reshape(-1, 3)  # the label tag sits above the box
    assert (tag == color).all(axis=1).sum() > 50
    assert np.asarray(image).max() == 200  # the input is not modified


def test_label_tag_goes_inside_a_box_at_the_top_edge(image):
    det = Detection.from_box("dog", (10, 0, 80, 60), *image.size)
    pixels = np.asarray(viz.draw_detections(image, [det]))
    assert (pixels[2:12, 12:30] == viz.label_color("dog")).all(axis=-1).any()


def test_rendered_segmentation_changes_pixels_inside_the_mask_only(image, tmp_path):
    mask = np.zeros((120, 160), np.float32)
    yy, xx = np.mgrid[:120, :160]
    mask[(yy - 60) ** 2 + (xx - 80) ** 2 < 15**2] = 1.0
    det = Detection.from_box("ball", (50, 30, 110, 90), *image.size)
    det = Detection(**{**det.__dict__, "mask": mask})
    out = viz.draw_detections(image, [det], alpha=0.5)
    out.save(tmp_path / "segmentation.png")
    pixels = np.asarray(out).astype(int)
    color = np.array(viz.label_color("ball"))
    expected = np.round(np.array([200, 200, 200]) * 0.5 + color * 0.5)
    np.testing.assert_array_equal(pixels[60, 80], expected)  # mask centre: 50 % blend
    assert tuple(pixels[45, 65]) == (200, 200, 200)  # in the box, outside the mask
    assert tuple(pixels[110, 150]) == BACKGROUND
    no_masks = np.asarray(viz.draw_detections(image, [det], show_masks=False))
    assert tuple(no_masks[60, 80]) == (200, 200, 200)


def test_segmentation_pipeline_from_model_text(image, tmp_path):
    from pali_kit.segmentation import load_vae, with_masks

    spec = importlib.util.spec_from_file_location("mrv", REPO / "scripts/make_random_vae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    vae = load_vae(script.make_random_vae(tmp_path / "vae.npz", codebook_dim=64))
    seg = "".join(f"<seg{c:03d}>" for c in range(16))
    w, h = image.size
    dets = with_masks(
        parse_detections(f"<loc0256><loc0256><loc0768><loc0768>{seg} cat", w, h), vae, w, h
    )
    out = viz.draw_detections(image, dets)
    out.save(tmp_path / "pipeline.png")
    changed = (np.asarray(out) != np.asarray(image)).any(axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any()
    # Mask, box and label tag stay within the box and the tag above it.
    assert xs.min() >= 40 and xs.max() < 120 and ys.max() < 90


def test_masks_of_another_size_are_resized(image):
    det = Detection.from_box("cat", (0, 0, 160, 120), *image.size)
    det = Detection(**{**det.__dict__, "mask": np.ones((12, 16), np.float32)})
    pixels = np.asarray(viz.draw_detections(image, [det]))
    assert tuple(pixels[100, 20]) != BACKGROUND


# ----------------------------------------------------------------------------- captions and grids


def test_caption_goes_in_a_band_below_the_image(image, tmp_path):
    out = viz.draw_caption(image, "a grey square on a dark background")
    out.save(tmp_path / "caption.png")
    assert out.width == image.width and out.height > image.height
    np.testing.assert_array_equal(np.asarray(out)[: image.height], np.asarray(image))
    band = np.asarray(out)[image.height :]
    assert (band < 100).all(axis=-1).any()  # dark text pixels on the white band


def test_caption_above_keeps_the_image_at_the_bottom(image):
    out = viz.draw_caption(image, "hello", position="above")
    np.testing.assert_array_equal(np.asarray(out)[-image.height :], np.asarray(image))


def test_long_caption_wraps_to_more_lines(image):
    short = viz.draw_caption(image, "a cat")
    long = viz.draw_caption(image, " ".join(["a very long caption"] * 10))
    assert long.height > short.height + 20


def test_image_grid_tiles_row_major(image):
    grid = viz.image_grid([image] * 5, cols=2, pad=4)
    assert grid.size == (2 * 160 + 3 * 4, 3 * 120 + 4 * 4)


def test_show_returns_a_figure_with_one_axes_per_image(image, tmp_path):
    model_input = np.zeros((1, 32, 32, 3), np.float32)
    fig = viz.show([image, model_input], titles=["original", "model input"], cols=2)
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "model input"
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_show_accepts_a_single_image(image):
    assert len(viz.show(image).axes) == 1


def test_demo_vae_segmentation_of_a_sample_scene_is_drawn_where_the_shapes_are(tmp_path):
    """Annotation -> <loc>+<seg> text (demo VAE encoder) -> parse -> decode -> overlay PNG."""
    from pali_kit import data
    from pali_kit.detection import detections_to_text
    from pali_kit.segmentation import load_vae, mask_to_codes, with_masks

    vae = load_vae("demo")
    scene = data.make_scene(7, 3, size=224, min_shapes=2)
    truth = [(o.label, o.box, mask_to_codes(vae, o.mask, o.box)) for o in scene.objects]
    text = detections_to_text(truth, 224, 224)
    dets = with_masks(parse_detections(text, 224, 224), vae, 224, 224)
    assert [d.label for d in dets] == [o.label for o in scene.objects]
    image = PIL.Image.fromarray(scene.image)
    out = viz.draw_detections(image, dets, alpha=0.5)
    out.save(tmp_path / "segmentation_demo_vae.png")
    before, after = np.asarray(image).astype(int), np.asarray(out).astype(int)
    for obj, det in zip(scene.objects, dets):
        iou = (obj.mask & det.binary_mask).sum() / (obj.mask | det.binary_mask).sum()
        assert iou > 0.85, (obj.label, iou)
        inside = obj.mask & det.binary_mask
        # the overlay blends the label colour into the shape's pixels
        changed = np.any(after[inside] != before[inside], axis=-1).mean()
        assert changed > 0.9
