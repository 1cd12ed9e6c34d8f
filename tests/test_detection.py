"""Parsing PaliGemma detection text, and building it back (pali_kit.detection)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pali_kit.detection import (
    Detection,
    box_to_loc,
    detections_to_text,
    from_supervision,
    loc_bins,
    parse_detections,
    to_supervision,
)

SEG16 = "".join(f"<seg{c:03d}>" for c in range(10, 26))
CODES16 = tuple(range(10, 26))


def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


# ----------------------------------------------------------------------------- the format


def test_spec_example_two_objects():
    text = "<loc0102><loc0250><loc0870><loc0990> cat ; <loc0000><loc0000><loc1023><loc1023> dog"
    cat, dog = parse_detections(text, width=1024, height=1024)
    assert cat == Detection(
        label="cat",
        box=(250.0, 102.0, 990.0, 870.0),
        box_normalized=(250 / 1024, 102 / 1024, 990 / 1024, 870 / 1024),
        loc_tokens=(102, 250, 870, 990),
    )
    assert dog.label == "dog"
    assert dog.box == (0.0, 0.0, 1023.0, 1023.0)
    assert dog.seg_codes is None and dog.mask is None and dog.score == 1.0


def test_coordinates_are_y_first_and_scaled_to_width_and_height():
    (det,) = parse_detections(loc(256, 512, 768, 1000) + " car", width=640, height=480)
    assert det.box == (320.0, 120.0, 625.0, 360.0)  # x = bin / 1024 * 640, y = bin / 1024 * 480
    assert det.loc_tokens == (256, 512, 768, 1000)


def test_scale_1023_is_big_vision_convention():
    (det,) = parse_detections(loc(0, 0, 1023, 1023) + " x", 100, 50, scale=1023)
    assert det.box == (0.0, 0.0, 100.0, 50.0)
    assert det.box_normalized == (0.0, 0.0, 1.0, 1.0)


def test_segmentation_object_has_16_seg_codes():
    (det,) = parse_detections(loc(10, 20, 300, 400) + SEG16 + " cat", 224, 224)
    assert det.seg_codes == CODES16
    assert det.label == "cat"


def test_refcoco_style_seg_output_without_label():
    (det,) = parse_detections(loc(10, 20, 300, 400) + SEG16, 224, 224)
    assert det.label == "" and det.seg_codes == CODES16


def test_missing_label_gives_empty_label():
    dets = parse_detections(loc(1, 2, 3, 4) + " ; " + loc(5, 6, 7, 8) + " bird", 224, 224)
    assert [d.label for d in dets] == ["", "bird"]


def test_missing_separator_still_splits_objects():
    dets = parse_detections(loc(1, 2, 3, 4) + " cat " + loc(5, 6, 7, 8) + " dog", 224, 224)
    assert [d.label for d in dets] == ["cat", "dog"]


def test_leading_prompt_text_is_ignored():
    dets = parse_detections("detect cat ; dog\n" + loc(1, 2, 3, 4) + " cat", 224, 224)
    assert [d.label for d in dets] == ["cat"]


def test_multi_word_label_with_whitespace_collapsed():
    (det,) = parse_detections(loc(1, 2, 3, 4) + "  a   red\ncar  ", 224, 224)
    assert det.label == "a red car"


def test_whitespace_between_loc_tokens_is_allowed():
    (det,) = parse_detections("<loc0001> <loc0002>\n<loc0003> <loc0004> cat", 224, 224)
    assert det.loc_tokens == (1, 2, 3, 4)


def test_tags_inside_label_are_removed():
    (det,) = parse_detections(loc(1, 2, 3, 4) + " cat<unk> <seg005>", 224, 224)
    assert det.label == "cat"


# ----------------------------------------------------------------------------- broken outputs


def test_three_locs_then_text_is_skipped():
    assert parse_detections(loc(100, 200, 300) + " cat", 224, 224) == []


def test_truncated_output_gives_nothing():
    assert parse_detections("<loc0100><loc0100>", 224, 224) == []


def test_truncated_object_before_a_full_one_is_skipped():
    dets = parse_detections(loc(100, 200, 300) + " cat ; " + loc(1, 2, 3, 4) + " dog", 224, 224)
    assert [d.label for d in dets] == ["dog"]


def test_trailing_truncated_object_is_skipped():
    dets = parse_detections(loc(1, 2, 3, 4) + " dog ; <loc0005><loc00", 224, 224)
    assert [d.label for d in dets] == ["dog"]


def test_runaway_repetition_is_deduplicated():
    text = " ; ".join([loc(10, 20, 30, 40) + " cat"] * 500)
    assert len(parse_detections(text, 224, 224)) == 1


def test_distinct_objects_are_capped_at_max_objects():
    text = " ; ".join(loc(i, i, i + 1, i + 1) + " cat" for i in range(300))
    assert len(parse_detections(text, 224, 224)) == 100
    assert len(parse_detections(text, 224, 224, max_objects=7)) == 7


def test_same_box_with_different_labels_are_two_objects():
    dets = parse_detections(loc(1, 2, 3, 4) + " cat ; " + loc(1, 2, 3, 4) + " kitten", 224, 224)
    assert [d.label for d in dets] == ["cat", "kitten"]


def test_garbage_unicode_gives_nothing():
    assert parse_detections("🐈 ∑≈ç√∫ \x00\uffff <loc> <loc12> <seg1> ;;; <<>>", 224, 224) == []


def test_bin_above_1023_drops_that_object():
    dets = parse_detections(
        "<loc9999><loc0000><loc0100><loc0100> x ; " + loc(1, 2, 3, 4) + " y", 9, 9
    )
    assert [d.label for d in dets] == ["y"]


def test_text_after_eos_is_ignored():
    text = loc(1, 2, 3, 4) + " cat<eos>" + loc(5, 6, 7, 8) + " junk<pad><pad>"
    assert [d.label for d in parse_detections(text, 224, 224)] == ["cat"]


def test_pad_and_bos_remnants_are_removed():
    (det,) = parse_detections("<bos>" + loc(1, 2, 3, 4) + " cat<pad><pad>", 224, 224)
    assert det.label == "cat"


def test_inverted_box_is_swapped_by_default():
    (det,) = parse_detections(loc(800, 900, 100, 200) + " cat", 1024, 1024)
    assert det.loc_tokens == (100, 200, 800, 900)
    assert det.box == (200.0, 100.0, 900.0, 800.0)


def test_inverted_box_can_be_dropped():
    assert parse_detections(loc(800, 900, 100, 200) + " cat", 224, 224, inverted="drop") == []


def test_zero_area_box_is_kept():
    (det,) = parse_detections(loc(5, 5, 5, 5) + " dot", 224, 224)
    assert det.box[0] == det.box[2] and det.box[1] == det.box[3]


def test_fewer_than_16_seg_codes_keep_the_box_without_codes():
    (det,) = parse_detections(loc(1, 2, 3, 4) + SEG16[: 9 * 8] + " cat", 224, 224)
    assert det.seg_codes is None and det.label == "cat" and det.loc_tokens == (1, 2, 3, 4)


def test_more_than_16_seg_codes_keep_the_first_16():
    (det,) = parse_detections(loc(1, 2, 3, 4) + SEG16 + "<seg099><seg098> cat", 224, 224)
    assert det.seg_codes == CODES16 and det.label == "cat"


def test_seg_code_above_127_drops_the_codes_only():
    (det,) = parse_detections(loc(1, 2, 3, 4) + "<seg200>" + SEG16[8:] + " cat", 224, 224)
    assert det.seg_codes is None and det.label == "cat"


def test_non_string_input_is_a_type_error_naming_text():
    with pytest.raises(TypeError, match="text=None"):
        parse_detections(None, 224, 224)


def test_bad_image_size_raises():
    with pytest.raises(ValueError, match="positive"):
        parse_detections("", 0, 224)


# ----------------------------------------------------------------------------- fuzzing

PIECES = st.one_of(
    st.integers(0, 9999).map(lambda b: f"<loc{b:04d}>"),
    st.integers(0, 999).map(lambda c: f"<seg{c:03d}>"),
    st.sampled_from([" ; ", ";", " ", "\n", "<eos>", "<pad>", "<bos>", "<unk>", "<loc", ">", "<"]),
    st.sampled_from(["cat", "a red car", "狗", "🐈", "\x00", ""]),
    st.text(max_size=8),
)


def check_detections(dets, width, height):
    assert len(dets) <= 100
    for d in dets:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert all(0.0 <= v <= 1.0 for v in d.box_normalized)
        assert all(0 <= b <= 1023 for b in d.loc_tokens)
        assert d.seg_codes is None or (len(d.seg_codes) == 16 and max(d.seg_codes) < 128)
        assert ";" not in d.label and d.label == d.label.strip()


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=60), st.integers(1, 4000), st.integers(1, 4000))
def test_fuzz_token_soup_never_raises_and_boxes_are_valid(pieces, width, height):
    check_detections(parse_detections("".join(pieces), width, height), width, height)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_any_text_never_raises(text):
    check_detections(parse_detections(text, 224, 224), 224, 224)


# ----------------------------------------------------------------------------- building targets


def test_box_to_loc_is_y_first():
    assert box_to_loc((56, 112, 168, 224), 224, 224) == "<loc0512><loc0256><loc1023><loc0768>"


def test_box_to_loc_clips_outside_boxes():
    assert box_to_loc((-10, -5, 300, 250), 224, 224) == "<loc0000><loc0000><loc1023><loc1023>"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 224, allow_nan=False), min_size=4, max_size=4))
def test_box_tokens_box_round_trip_within_one_pixel_at_224(coords):
    x0, x1 = sorted(coords[:2])
    y0, y1 = sorted(coords[2:])
    (det,) = parse_detections(box_to_loc((x0, y0, x1, y1), 224, 224) + " a", 224, 224)
    assert np.max(np.abs(np.subtract(det.box, (x0, y0, x1, y1)))) <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 224, allow_nan=False), min_size=4, max_size=4))
def test_round_trip_with_scale_1023(coords):
    x0, x1 = sorted(coords[:2])
    y0, y1 = sorted(coords[2:])
    text = box_to_loc((x0, y0, x1, y1), 224, 224, scale=1023)
    (det,) = parse_detections(text, 224, 224, scale=1023)
    assert np.max(np.abs(np.subtract(det.box, (x0, y0, x1, y1)))) <= 0.5 * 224 / 1023 + 1e-9


def test_detections_to_text_joins_objects_with_semicolons():
    text = detections_to_text([("cat", (56, 112, 168, 224)), ("dog", (0, 0, 224, 224))], 224, 224)
    assert (
        text
        == "<loc0512><loc0256><loc1023><loc0768> cat ; <loc0000><loc0000><loc1023><loc1023> dog"
    )


def test_detections_to_text_with_seg_codes_and_no_label():
    text = detections_to_text([("", (0, 0, 224, 224), CODES16)], 224, 224)
    assert text == "<loc0000><loc0000><loc1023><loc1023>" + SEG16


def test_parse_of_built_text_gives_the_same_objects_back():
    text = "<loc0102><loc0250><loc0870><loc0990> cat ; <loc0000><loc0000><loc1023><loc1023>" + SEG16
    dets = parse_detections(text, 640, 480)
    assert detections_to_text(dets, 640, 480) == text


def test_seg_codes_must_be_16_in_range():
    with pytest.raises(ValueError, match="16 seg codes"):
        detections_to_text([("cat", (0, 0, 1, 1), (1, 2, 3))], 224, 224)
    with pytest.raises(ValueError, match="16 seg codes"):
        detections_to_text([("cat", (0, 0, 1, 1), (128,) * 16)], 224, 224)


def test_detection_from_box_computes_bins_and_normalized_box():
    det = Detection.from_box("cat", (56, 112, 168, 224), 224, 224)
    assert det.loc_tokens == loc_bins((56, 112, 168, 224), 224, 224) == (512, 256, 1023, 768)
    assert det.box_normalized == (0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------- light imports and supervision


def test_importing_detection_does_not_import_jax():
    code = "import sys, pali_kit.detection; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _supervision():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("supervision")


def test_to_supervision_carries_boxes_labels_and_scores():
    _supervision()
    dets = parse_detections(
        loc(0, 0, 512, 512) + " cat ; " + loc(0, 512, 512, 1023) + " dog", 100, 100
    )
    sv_dets = to_supervision(dets)
    np.testing.assert_allclose(sv_dets.xyxy, [[0, 0, 50, 50], [50, 0, 99.90234375, 50]])
    assert list(sv_dets.data["class_name"]) == ["cat", "dog"]
    assert list(sv_dets.class_id) == [0, 1]
    assert list(sv_dets.confidence) == [1.0, 1.0]
    assert sv_dets.mask is None


def test_supervision_round_trip_keeps_labels_boxes_and_masks():
    sv = _supervision()
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 5:10, 5:10] = True
    sv_dets = sv.Detections(
        xyxy=np.array([[5, 5, 10, 10], [20, 10, 60, 40]], np.float32),
        mask=masks,
        class_id=np.array([3, 7]),
    )
    dets = from_supervision(sv_dets, ["cat", "dog"], width=60, height=40)
    assert [d.label for d in dets] == ["cat", "dog"]
    assert dets[1].box == (20.0, 10.0, 60.0, 40.0)
    assert dets[0].binary_mask.sum() == 25 and dets[1].binary_mask.sum() == 0
    back = to_supervision(dets)
    np.testing.assert_array_equal(back.mask, masks)
    np.testing.assert_allclose(back.xyxy, sv_dets.xyxy)


def test_from_supervision_labels_default_to_class_ids():
    sv = _supervision()
    sv_dets = sv.Detections(xyxy=np.array([[0, 0, 1, 1]], np.float32), class_id=np.array([4]))
    assert from_supervision(sv_dets, width=10, height=10)[0].label == "4"
