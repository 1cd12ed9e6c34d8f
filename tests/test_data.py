"""Training data (pali_kit.data): jsonl files, COCO, synthetic shapes, batches and prefetch."""

from __future__ import annotations

import gc
import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pali_kit import data as pdata
from pali_kit.data import (
    COLOURS,
    Batcher,
    CocoDataset,
    DataError,
    Dataset,
    Example,
    JsonlDataset,
    Prefetch,
    ShapesDataset,
    batches,
    collate,
    eval_batches,
    make_scene,
)
from pali_kit.detection import parse_detections
from pali_kit.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample_dataset"
KEYS = {"image", "text", "mask_ar", "mask_loss", "mask_input"}

# pycocotools' mask decoder trips a numpy 2 DeprecationWarning inside its Cython code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.demo()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines are dicts (dumped as JSON), str (written as is) or bytes."""
    raw = b"".join(
        (
            line
            if isinstance(line, bytes)
            else (line if isinstance(line, str) else json.dumps(line)).encode()
        )
        + b"\n"
        for line in lines
    )
    path.write_bytes(raw)
    return path


def png(path: Path, colour=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def row(image="a.png", prefix="caption en", suffix="a red square", **extra):
    return {"image": image, "prefix": prefix, "suffix": suffix, **extra}


def shape_examples(n: int) -> list[Example]:
    """n small distinct examples (16 px images, prefix 'caption en', suffix 'i')."""
    pixels = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(n)]
    return [Example(p, "caption en", str(i), f"ex {i}") for i, p in enumerate(pixels)]


# ============================================================================ jsonl


def test_jsonl_reads_image_prefix_suffix_and_keeps_extra_keys(tmp_path):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "train.jsonl", [row(task="caption", id=7)])
    (ex,) = JsonlDataset(path)
    assert (ex.prefix, ex.suffix) == ("caption en", "a red square")
    assert ex.meta == {"task": "caption", "id": 7}
    assert ex.source == f"{path}:1"


def test_jsonl_image_paths_are_relative_to_the_jsonl_folder(tmp_path, monkeypatch):
    png(tmp_path / "data" / "imgs" / "a.png")
    absolute = png(tmp_path / "elsewhere" / "b.png")
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [row("imgs/a.png"), row(str(absolute))])
    monkeypatch.chdir(tmp_path)  # not the jsonl folder
    a, b = JsonlDataset(path)
    assert Path(a.image) == tmp_path / "data" / "imgs" / "a.png"
    assert Path(b.image) == absolute
    assert a.pixels(4).shape == (4, 4, 3)


def test_jsonl_image_dir_overrides_the_jsonl_folder(tmp_path):
    png(tmp_path / "pics" / "a.png")
    path = write_jsonl(tmp_path / "train.jsonl", [row("a.png")])
    (ex,) = JsonlDataset(path, image_dir=tmp_path / "pics")
    assert Path(ex.image) == tmp_path / "pics" / "a.png"


def test_jsonl_fixed_prefix_replaces_the_lines_prefix(tmp_path):
    lines = [{"image": "a.png", "suffix": "x"}, row(prefix="answer en what")]
    a, b = JsonlDataset(write_jsonl(tmp_path / "t.jsonl", lines), prefix="caption en")
    assert a.prefix == b.prefix == "caption en"
    assert b.meta["prefix"] == "answer en what"  # the line's own prefix is kept aside


def test_jsonl_blank_lines_are_ignored_but_counted(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(), "", "   ", row(suffix=5)])
    with pytest.raises(DataError, match=r"t\.jsonl:4: 'suffix' must be a string"):
        JsonlDataset(path)


BAD_LINES = [
    ('{"image": "a.png", "prefix": "p", "suffix": "s"', "invalid JSON"),
    ("[1, 2]", "expected a JSON object {...}, got a array"),
    ({"prefix": "p", "suffix": "s"}, "missing key 'image'"),
    ({"image": "a.png", "prefix": "p"}, "missing key 'suffix'"),
    ({"image": "a.png", "suffix": "s"}, "missing key 'prefix'"),
    (row(suffix=3), "'suffix' must be a string, got a number"),
    (row(prefix=None), "'prefix' must be a string, got a null"),
    (row(image=["a.png"]), "'image' must be a string, got a array"),
    (row(image=" "), "'image' is empty"),
    (row(image="https://example.com/a.png"), "is a URL"),
    (b'{"image": "a.png", "prefix": "p", "suffix": "\xff"}', "not UTF-8"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_jsonl_bad_line_is_reported_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "train.jsonl", [row(), line])
    with pytest.raises(DataError) as info:
        JsonlDataset(path)
    assert f"{path}:2: " in str(info.value)
    assert message in str(info.value)


def test_jsonl_all_bad_lines_are_listed_in_one_error_up_to_a_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row()] + ["not json"] * 15)
    with pytest.raises(DataError) as info:
        JsonlDataset(path, max_listed=10)
    message = str(info.value)
    assert "15 bad line(s)" in message
    assert f"{path}:2:" in message and f"{path}:11:" in message
    assert f"{path}:12:" not in message
    assert "... and 5 more" in message


def test_jsonl_on_error_skip_leaves_bad_lines_out_and_records_them(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(suffix="one"), "{", row(suffix="three")])
    ds = JsonlDataset(path, on_error="skip")
    assert [ex.suffix for ex in ds] == ["one", "three"]
    assert [(e.line, str(e)) for e in ds.errors] == [(2, f"{path}:2: {ds.errors[0].message}")]


def test_jsonl_on_error_warn_warns_and_leaves_bad_lines_out(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(), {"image": "a.png"}])
    with pytest.warns(UserWarning, match=r"t\.jsonl:2: missing key 'suffix'"):
        ds = JsonlDataset(path, on_error="warn")
    assert len(ds) == 1


def test_jsonl_without_valid_lines_or_file_raises(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        JsonlDataset(write_jsonl(tmp_path / "t.jsonl", ["{"]), on_error="skip")
    with pytest.raises(DataError, match="no examples"):
        JsonlDataset(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonlDataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        JsonlDataset(write_jsonl(tmp_path / "u.jsonl", [row()]), on_error="ignore")


def test_jsonl_missing_image_fails_at_load_time_naming_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row("nope.png")])
    ds = JsonlDataset(path)  # images are not opened yet
    with pytest.raises(DataError, match=r"t\.jsonl:1: image .*nope\.png.*not found"):
        ds[0].pixels(16)


def test_jsonl_validate_reports_missing_and_corrupt_images(tmp_path):
    png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    lines = [row("good.png"), row("gone.png"), row("bad.png"), row("good.png")]
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError) as info:
        JsonlDataset(path).validate()
    message = str(info.value)
    assert "2 bad line(s)" in message
    assert f"{path}:2: image" in message and "not found" in message
    assert f"{path}:3: image" in message and "not in an image format" in message


def test_jsonl_validate_with_skip_drops_lines_with_bad_images(tmp_path):
    png(tmp_path / "good.png")
    path = write_jsonl(tmp_path / "t.jsonl", [row("good.png"), row("gone.png", suffix="x")])
    ds = JsonlDataset(path, on_error="skip")
    assert ds.validate() is ds
    assert len(ds) == 1 and [e.line for e in ds.errors] == [2]


def test_plain_lists_of_examples_or_dicts_are_datasets(tok):
    pixels = np.zeros((8, 8, 3), np.uint8)
    items = [
        Example(pixels, "caption en", "a"),
        {"image": pixels, "prefix": "caption en", "suffix": "b"},
    ]
    assert [pdata.get_example(items, i).suffix for i in range(2)] == ["a", "b"]
    batch = Batcher(items, tok, batch_size=2, text_len=8, image_size=8, shuffle=False).batch(0)
    assert batch["text"].shape == (2, 9)


# ============================================================================ COCO


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0] + runs


DOG_MASK = np.zeros((20, 40), bool)
DOG_MASK[10:15, 20:30] = True

COCO = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
        {"id": 2, "file_name": "b.png", "width": 30, "height": 30},
        {"id": 3, "file_name": "empty.png", "width": 10, "height": 10},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 2, 8, 6], "iscrowd": 0,
         "segmentation": [[4, 2, 12, 2, 12, 8, 4, 8]]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 10, 10, 5], "iscrowd": 0,
         "segmentation": {"size": [20, 40], "counts": rle_counts(DOG_MASK)}},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [30, 0, 5, 5], "iscrowd": 0,
         "segmentation": [[30, 0, 35, 0, 35, 5, 30, 5]]},
        {"id": 13, "image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 30], "iscrowd": 1,
         "segmentation": [[0, 0, 30, 0, 30, 30]]},
        {"id": 14, "image_id": 2, "category_id": 3, "bbox": [3, 3, 0.5, 10], "iscrowd": 0,
         "segmentation": [[3, 3, 3.5, 3, 3.5, 13]]},
        {"id": 15, "image_id": 2, "category_id": 3, "bbox": [1, 1, 10, 10], "iscrowd": 0,
         "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
    ],
}  # fmt: skip


@pytest.fixture
def coco_file(tmp_path) -> Path:
    path = tmp_path / "annotations" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps(COCO))
    return path


def test_coco_boxes_become_y_first_loc_tokens(coco_file):
    ds = CocoDataset(coco_file)
    objects = ds[0].suffix.split(" ; ")
    # cat bbox [4, 2, 8, 6] in a 40 x 20 image: y 2/20, x 4/40, y 8/20, x 12/40 of 1024 bins
    assert "<loc0102><loc0102><loc0410><loc0307> cat" in objects
    # dog bbox [20, 10, 10, 5]: y 10/20, x 20/40, y 15/20, x 30/40
    assert "<loc0512><loc0512><loc0768><loc0768> dog" in objects
    assert len(objects) == 3


def test_coco_one_example_per_image_names_each_category_once(coco_file):
    ds = CocoDataset(coco_file)
    assert [ex.prefix for ex in ds] == ["detect cat ; dog", "detect bird"]  # image 3: no objects
    assert Path(ds[0].image) == coco_file.parent / "a.png"  # default image_dir: the json's folder
    assert ds[0].meta["image_id"] == 1 and ds[0].meta["size"] == (40, 20)


def test_coco_per_category_gives_one_example_per_image_and_category(coco_file, tmp_path):
    ds = CocoDataset(coco_file, tmp_path / "images", per="category")
    assert [ex.prefix for ex in ds] == ["detect cat", "detect dog", "detect bird"]
    assert ds[0].suffix.count("cat") == 2 and "dog" not in ds[0].suffix
    assert Path(ds[0].image) == tmp_path / "images" / "a.png"


def test_coco_skips_crowd_and_sub_pixel_boxes_unless_asked(coco_file):
    assert [o.annotation_id for o in CocoDataset(coco_file).objects(1)] == [15]
    crowd = CocoDataset(coco_file, include_crowd=True)
    assert crowd[1].prefix == "detect dog ; bird"


def test_coco_category_filter(coco_file):
    ds = CocoDataset(coco_file, categories=["dog"])
    assert [ex.prefix for ex in ds] == ["detect dog"]
    with pytest.raises(ValueError, match="unknown categories"):
        CocoDataset(coco_file, categories=["unicorn"])


def test_coco_polygons_and_rle_become_masks(coco_file):
    ds = CocoDataset(coco_file)
    cat, dog, _ = ds.objects(0)
    cat_mask = ds.mask(cat)
    assert cat_mask.shape == (20, 40) and cat_mask.dtype == bool
    expected = np.zeros((20, 40), bool)
    expected[2:8, 4:12] = True
    np.testing.assert_array_equal(cat_mask, expected)
    np.testing.assert_array_equal(ds.mask(dog), DOG_MASK)


def test_coco_object_order_is_shuffled_per_epoch_deterministically(coco_file):
    ds = CocoDataset(coco_file, seed=3)
    orders = [ds.example(0, epoch=e).suffix for e in range(12)]
    assert orders == [CocoDataset(coco_file, seed=3).example(0, epoch=e).suffix for e in range(12)]
    assert len(set(orders)) > 1  # 3 objects: the order changes between epochs
    assert all(sorted(o.split(" ; ")) == sorted(orders[0].split(" ; ")) for o in orders)
    assert ds[0].suffix == orders[0]  # ds[i] is epoch 0


def test_coco_segment_puts_vae_codes_after_each_box_and_caches_them(coco_file):
    calls = []

    def fake_vae(mask, box):
        calls.append(box)
        return [int(mask.sum()) % 128] * 16

    ds = CocoDataset(coco_file, task="segment", vae=fake_vae)
    for epoch in range(3):
        ex = ds.example(0, epoch)
    assert ex.prefix == "segment cat ; dog"
    dets = {d.label + str(d.loc_tokens): d for d in parse_detections(ex.suffix, 40, 20)}
    cat = dets["cat(102, 102, 410, 307)"]
    assert cat.seg_codes == (48,) * 16  # the 8 x 6 polygon mask has 48 pixels
    assert len(calls) == 3  # once per annotation, not per epoch


def test_coco_segment_uses_mask_to_codes_of_the_vae(coco_file, tmp_path):
    from pali_kit.segmentation import load_vae, mask_to_codes

    vae = load_vae(_script("make_random_vae").make_random_vae(tmp_path / "v.npz", codebook_dim=8))
    ds = CocoDataset(coco_file, task="segment", vae=vae, categories=["bird"])
    (obj,) = ds.objects(0)
    want = mask_to_codes(vae, ds.mask(obj), obj.box)
    assert parse_detections(ds[0].suffix, 30, 30)[0].seg_codes == want


def test_coco_errors_name_the_file_and_the_entry(tmp_path):
    bad = json.loads(json.dumps(COCO))
    bad["annotations"][1]["image_id"] = 99
    with pytest.raises(
        DataError, match=r"annotations\[1\] \(id 11\): image_id 99 is not in 'images'"
    ):
        CocoDataset(bad)
    bad["annotations"][1] = {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2]}
    with pytest.raises(DataError, match="bbox must be 4 numbers"):
        CocoDataset(bad)
    with pytest.raises(DataError, match="no list 'images'"):
        CocoDataset({"annotations": [], "categories": []})
    with pytest.raises(ValueError, match="needs vae"):
        CocoDataset(COCO, task="segment")


# ============================================================================ synthetic shapes


def test_scene_is_exactly_reproducible_from_seed_and_index():
    a, b = make_scene(5, 17, 64), make_scene(5, 17, 64)
    np.testing.assert_array_equal(a.image, b.image)
    assert [(o.label, o.colour, o.box) for o in a.objects] == [
        (o.label, o.colour, o.box) for o in b.objects
    ]
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)


def test_scenes_differ_across_indices_and_seeds():
    images = [make_scene(0, i).image for i in range(8)] + [make_scene(1, 0).image]
    assert len({im.tobytes() for im in images}) == len(images)


@pytest.mark.parametrize("size", [64, 224])
def test_scene_ground_truth_matches_the_pixels(size):
    for index in range(25):
        scene = make_scene(0, index, size)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.label for o in scene.objects}) == len(scene.objects)  # distinct kinds
        covered = np.zeros((size, size), bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            ys, xs = np.nonzero(obj.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)  # tight
            assert (scene.image[obj.mask] == COLOURS[obj.colour]).all()
            assert not (covered & obj.mask).any()  # shapes do not overlap
            covered |= obj.mask
        assert (scene.image[~covered] == scene.background).all()


def test_scene_shape_count_limits():
    counts = {len(make_scene(0, i, min_shapes=2, max_shapes=2).objects) for i in range(20)}
    assert counts == {2}
    assert {len(make_scene(0, i).objects) for i in range(40)} == {1, 2, 3}
    with pytest.raises(ValueError):
        make_scene(0, 0, min_shapes=0)


def test_shapes_caption_lists_objects_left_to_right():
    scene = next(s for s in (make_scene(0, i) for i in range(50)) if len(s.objects) == 3)
    first, second, third = sorted(scene.objects, key=lambda o: o.box[0])
    want = f"a {first.colour} {first.label}, a {second.colour} {second.label} and a {third.colour} {third.label}"
    assert scene.caption() == want


def test_shapes_answers_match_the_ground_truth():
    ds = ShapesDataset(30, tasks=("caption", "count", "color", "detect", "detect_all"))
    for i in range(len(ds)):
        ex = ds[i]
        scene, objects, task = ex.meta["scene"], ex.meta["objects"], ex.meta["task"]
        if task == "caption":
            assert ex.prefix == "caption en" and ex.suffix == scene.caption()
        elif task == "count":
            assert ex.prefix == "answer en how many shapes"
            assert ex.suffix == str(len(scene.objects))
        elif task == "color":
            (obj,) = objects
            assert (
                ex.prefix == f"answer en what color is the {obj.label}" and ex.suffix == obj.colour
            )
        else:
            assert ex.prefix == "detect " + " ; ".join(o.label for o in objects)
            dets = parse_detections(ex.suffix, 64, 64)
            assert [d.label for d in dets] == [o.label for o in objects]  # prompt order
            for det, obj in zip(dets, objects):
                # quantisation: one loc bin is 64 / 1024 = 0.06 px at this size
                assert np.allclose(det.box, obj.box, atol=0.1)
        np.testing.assert_array_equal(ex.image, scene.image)


def test_shapes_question_target_is_fixed_per_epoch_and_varies_across_epochs():
    ds = ShapesDataset(40, tasks=("color",), seed=2)
    again = ShapesDataset(40, tasks=("color",), seed=2)
    assert all(ds.example(i, 4).prefix == again.example(i, 4).prefix for i in range(40))
    varied = sum(len({ds.example(i, e).prefix for e in range(6)}) > 1 for i in range(40))
    assert varied > 10


def test_shapes_segment_needs_a_vae_and_adds_seg_codes():
    with pytest.raises(ValueError, match="needs vae"):
        ShapesDataset(4, tasks=("segment",))
    calls = []

    def fake_vae(mask, box):
        calls.append(box)
        return range(16)

    ds = ShapesDataset(4, tasks=("segment",), vae=fake_vae)
    ex = ds[0]
    (det,) = parse_detections(ex.suffix, 64, 64)
    assert ex.prefix == f"segment {det.label}" and det.seg_codes == tuple(range(16))
    ds[0]
    assert len(calls) == 1  # cached


def test_shapes_dataset_len_and_task_layout():
    ds = ShapesDataset(5, tasks=("count", "caption", "count"))
    assert len(ds) == 15
    assert [ds[i].meta["task"] for i in range(3)] == ["count", "caption", "count"]
    assert ds[3].meta["image_index"] == 1
    with pytest.raises(ValueError, match="unknown tasks"):
        ShapesDataset(5, tasks=("colour",))


# ============================================================================ batches


def test_batch_shapes_dtypes_and_value_ranges(tok):
    ds = ShapesDataset(8, tasks=("caption", "detect"))
    batch = next(iter(batches(ds, tok, batch_size=4, text_len=24, image_size=32, seed=0)))
    assert set(batch) == KEYS
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    for key in ("text", "mask_ar", "mask_loss"):
        assert batch[key].shape == (4, 25) and batch[key].dtype == np.int32
    assert batch["mask_input"].shape == (4, 25) and batch["mask_input"].dtype == bool


def test_batch_padding_follows_the_tokenizer(tok):
    examples = shape_examples(2)
    batch = collate(examples, tok, text_len=16, image_size=16)
    want = tok.encode_examples(["caption en"] * 2, ["0", "1"], text_len=16)
    for key in want:
        np.testing.assert_array_equal(batch[key], want[key])
    pad = ~batch["mask_input"]
    assert pad.any()
    assert (batch["text"][pad] == 0).all() and (batch["mask_loss"][pad] == 0).all()
    assert (batch["mask_ar"][pad] == 1).all()


def test_batch_images_are_the_preprocessed_examples(tok):
    examples = shape_examples(3)
    batch = collate(examples, tok, text_len=8, image_size=16)
    # same-size "resize" and x / 127.5 - 1 in float32 vs float64: values in [-1, 1] within
    # a few roundings (1e-6 = 8 eps)
    np.testing.assert_allclose(batch["image"][2], examples[2].image / 127.5 - 1.0, atol=1e-6)


def test_each_epoch_visits_every_example_once_in_a_new_order(tok):
    b = Batcher(
        shape_examples(10),
        tok,
        batch_size=4,
        text_len=8,
        image_size=16,
        seed=1,
        drop_remainder=False,
    )
    assert b.steps_per_epoch == 3
    epochs = [np.concatenate([b.indices(e * 3 + k)[1] for k in range(3)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert len({tuple(o) for o in epochs}) == 3
    assert len(b.indices(2)[1]) == 2  # the last batch of an epoch has n % B rows


def test_drop_remainder_leaves_out_the_partial_batch(tok):
    b = Batcher(shape_examples(10), tok, batch_size=4, text_len=8, image_size=16)
    assert b.steps_per_epoch == 2 and all(len(b.indices(s)[1]) == 4 for s in range(6))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Batcher(shape_examples(3), tok, batch_size=4, text_len=8, image_size=16)


def test_unshuffled_batches_are_in_dataset_order(tok):
    b = Batcher(shape_examples(6), tok, batch_size=3, text_len=8, image_size=16, shuffle=False)
    assert [b.indices(s)[1].tolist() for s in range(4)] == [[0, 1, 2], [3, 4, 5]] * 2


def test_same_seed_gives_the_same_batches_and_another_seed_another_order(tok):
    ds = ShapesDataset(6, tasks=("caption", "count"))

    def first(seed, n=3):
        it = batches(ds, tok, batch_size=4, text_len=24, image_size=16, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["text"], z["text"]) for x, z in zip(a, c))


def test_start_step_resumes_exactly_where_a_run_left_off(tok):
    ds = ShapesDataset(5, tasks=("caption", "detect"))
    kw = dict(batch_size=3, text_len=24, image_size=16, seed=4, epochs=3)
    full = list(batches(ds, tok, **kw))
    assert len(full) == 3 * (10 // 3)
    resumed = batches(ds, tok, start_step=4, **kw)
    assert resumed.position == 4
    rest = list(resumed)
    assert len(rest) == len(full) - 4 and resumed.position == len(full)
    for x, y in zip(full[4:], rest):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


class EpochRecorder(Dataset):
    """Records which (index, epoch) pairs were asked for."""

    def __init__(self, n):
        self.n, self.seen = n, []

    def __len__(self):
        return self.n

    def example(self, index, epoch=0):
        self.seen.append((index, epoch))
        return Example(np.zeros((8, 8, 3), np.uint8), "caption en", f"{index} {epoch}")


def test_the_epoch_number_reaches_the_dataset(tok):
    ds = EpochRecorder(4)
    list(batches(ds, tok, batch_size=2, text_len=8, image_size=8, epochs=2, prefetch=0))
    assert sorted(ds.seen) == sorted((i, e) for i in range(4) for e in range(2))


def test_finite_epochs_stop_and_none_repeats(tok):
    b = Batcher(shape_examples(4), tok, batch_size=2, text_len=8, image_size=16, epochs=2)
    assert b.num_steps == 4 and len(list(b)) == 4
    forever = batches(shape_examples(4), tok, batch_size=2, text_len=8, image_size=16)
    assert len([next(forever) for _ in range(7)]) == 7
    forever.close()


def test_prefetched_batches_equal_synchronous_ones(tok):
    kw = dict(batch_size=2, text_len=8, image_size=16, seed=3, epochs=2)
    eager = list(batches(shape_examples(5), tok, prefetch=0, **kw))
    ahead = list(batches(shape_examples(5), tok, prefetch=3, **kw))
    assert len(eager) == len(ahead) == 4
    for x, y in zip(eager, ahead):
        np.testing.assert_array_equal(x["text"], y["text"])
        np.testing.assert_array_equal(x["image"], y["image"])


class Exploding(EpochRecorder):
    def example(self, index, epoch=0):
        if index == 3:
            raise KeyError(f"no example {index} in epoch {epoch}")
        return super().example(index, epoch)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_errors_while_preparing_a_batch_reach_the_consumer(tok, prefetch):
    it = batches(
        Exploding(4), tok, batch_size=2, text_len=8, image_size=8, shuffle=False, prefetch=prefetch
    )
    next(it)
    with pytest.raises(KeyError, match="no example 3 in epoch 0"):
        next(it)
    with pytest.raises(StopIteration):  # the iterator is finished afterwards
        next(it)


def test_a_missing_image_in_a_batch_names_the_jsonl_line(tmp_path, tok):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "t.jsonl", [row("a.png"), row("gone.png")])
    it = batches(JsonlDataset(path), tok, batch_size=2, text_len=16, image_size=8)
    with pytest.raises(DataError, match=r"t\.jsonl:2: image .*gone\.png"):
        next(it)


def prefetch_threads() -> int:
    return sum(t.name == "pali_kit-prefetch" and t.is_alive() for t in threading.enumerate())


def wait_for_threads(count: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while prefetch_threads() > count and time.monotonic() < deadline:
        time.sleep(0.02)
    return prefetch_threads()


def test_prefetch_thread_stops_when_the_consumer_closes_or_drops_the_iterator():
    before = prefetch_threads()
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    it = Prefetch(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2] and it.position == 3
    it.close()
    assert wait_for_threads(before) == before and closed == [True]
    with pytest.raises(StopIteration):
        next(it)

    for item in Prefetch(endless(), 2):  # a `break` drops the iterator
        if item == 2:
            break
    gc.collect()
    assert wait_for_threads(before) == before

    with Prefetch(endless(), 1) as it:
        next(it)
    assert wait_for_threads(before) == before


def test_prefetch_reraises_the_original_exception():
    def failing():
        yield 1
        raise ValueError("image 7 is broken")

    it = Prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="^image 7 is broken$"):
        next(it)


# ============================================================================ eval batches


def test_eval_batches_pad_the_last_batch_with_flagged_dummies(tok):
    examples = shape_examples(10)
    out = list(eval_batches(examples, tok, batch_size=4, text_len=8, image_size=16))
    assert [len(exs) for _, exs in out] == [4, 4, 2]
    for batch, _ in out:
        assert set(batch) == {"image", "text", "mask_ar", "mask_input", "_mask"}
        assert batch["image"].shape == (4, 16, 16, 3) and batch["text"].shape == (4, 8)
    last, real = out[-1]
    assert last["_mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(last["image"][3], last["image"][1])
    np.testing.assert_array_equal(last["text"][3], last["text"][1])


def test_eval_batches_hold_prompts_only_with_the_answers_aside(tok):
    examples = shape_examples(5)
    out = list(eval_batches(examples, tok, batch_size=2, text_len=8, image_size=16, prefetch=0))
    assert [ex.suffix for _, exs in out for ex in exs] == ["0", "1", "2", "3", "4"]  # in order
    batch, _ = out[0]
    want = tok.encode_prompts(["caption en"] * 2, text_len=8)
    for key in want:
        np.testing.assert_array_equal(batch[key], want[key])
    assert tok.eos_id not in batch["text"]


# ============================================================================ the sample dataset


def test_sample_dataset_loads_validates_and_batches(tok):
    train = JsonlDataset(SAMPLE / "train.jsonl").validate()
    val = JsonlDataset(SAMPLE / "val.jsonl").validate()
    assert (len(train), len(val)) == (80, 16)
    assert {ex.meta["task"] for ex in train} == {"caption", "count", "color", "detect"}
    batch = next(iter(batches(train, tok, batch_size=8, text_len=32, image_size=64)))
    assert batch["image"].shape == (8, 64, 64, 3)
    assert (batch["mask_input"].sum(1) < 33).all()  # every example fits in text_len


def test_sample_dataset_is_small():
    total = sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file())
    assert total < 200 * 1024


def test_sample_dataset_script_reproduces_the_files(tmp_path):
    _script("make_sample_dataset").write(tmp_path)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_text() == (SAMPLE / name).read_text()
    for path in sorted((SAMPLE / "images").glob("*.png")):
        made = np.asarray(Image.open(tmp_path / "images" / path.name).convert("RGB"))
        np.testing.assert_array_equal(made, np.asarray(Image.open(path).convert("RGB")))
