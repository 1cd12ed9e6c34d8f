"""Metrics on cases small enough to compute by hand (pali_kit.metrics)."""

import math

import numpy as np
import pytest

from pali_kit import metrics
from pali_kit.detection import parse_detections

# ----------------------------------------------------------------------------- IoU


def test_box_iou_of_half_overlapping_boxes_is_one_third():
    assert metrics.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


def test_box_iou_of_disjoint_and_identical_boxes():
    assert metrics.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert metrics.box_iou([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0


def test_box_iou_of_zero_area_boxes_is_zero():
    assert metrics.box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0


def test_box_iou_broadcasts_to_a_pairwise_matrix():
    a = np.array([[0, 0, 10, 10], [0, 0, 5, 5]])
    b = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [20, 20, 30, 30]])
    iou = metrics.box_iou(a[:, None], b[None])
    np.testing.assert_allclose(iou, [[1, 0.25, 0], [0.25, 0, 0]])


def test_mask_iou_counts_pixels():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert metrics.mask_iou(a, b) == pytest.approx(4 / 12)


def test_mask_iou_thresholds_float_masks_at_one_half():
    assert metrics.mask_iou(np.array([[0.6, 0.4]]), np.array([[True, False]])) == 1.0


def test_mask_iou_of_two_empty_masks_is_zero():
    assert metrics.mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0


# ----------------------------------------------------------------------------- COCO mAP


@pytest.fixture
def coco():
    return pytest.importorskip("pycocotools")


GT = [
    [("cat", (10, 10, 50, 50)), ("dog", (60, 60, 90, 90))],
    [("cat", (0, 0, 20, 20))],
]


def test_perfect_predictions_give_map_one(coco):
    assert metrics.detection_map(GT, GT) == {"map": 1.0, "map50": 1.0, "map75": 1.0}


def test_parsed_detections_are_accepted(coco):
    text = "<loc0000><loc0000><loc0512><loc0512> cat"
    preds = [parse_detections(text, 100, 100)]
    assert metrics.detection_map(preds, [[("cat", (0, 0, 50, 50))]])["map"] == pytest.approx(1.0)


def test_half_recall_on_one_class_and_nothing_on_the_other(coco):
    # cat: 2 boxes, 1 found (IoU 0.95) -> precision 1 up to recall 0.5, i.e. 51 of
    # COCO's 101 recall points; dog: AP 0. Mean over the two classes.
    preds = [[("cat", (12, 10, 50, 50))], []]
    result = metrics.detection_map(preds, GT)
    assert result["map50"] == pytest.approx(51 / 101 / 2)
    assert result["map"] == pytest.approx(51 / 101 / 2)


def test_a_wrong_label_is_a_miss(coco):
    preds = [[("dog", (10, 10, 50, 50))], []]
    assert metrics.detection_map(preds, [[("cat", (10, 10, 50, 50))], []])["map"] == 0.0


def test_loose_box_counts_at_iou_half_but_not_at_three_quarters(coco):
    preds = [[("cat", (0, 0, 10, 15))]]  # IoU with (0, 0, 10, 10) = 100 / 150
    result = metrics.detection_map(preds, [[("cat", (0, 0, 10, 10))]])
    assert result["map50"] == pytest.approx(1.0) and result["map75"] == 0.0


def test_no_predictions_score_zero_and_no_ground_truth_is_nan(coco):
    assert metrics.detection_map([[], []], GT)["map"] == 0.0
    assert math.isnan(metrics.detection_map(GT, [[], []])["map"])


def test_scores_rank_the_predictions(coco):
    right, wrong = (10, 10, 50, 50), (60, 0, 99, 40)
    gt = [[("cat", right)]]
    # A wrong box scored above the right one costs precision; scored below, nothing.
    bad = metrics.detection_map([[("cat", wrong, 0.9), ("cat", right, 0.1)]], gt)["map50"]
    good = metrics.detection_map([[("cat", wrong, 0.1), ("cat", right, 0.9)]], gt)["map50"]
    assert good == pytest.approx(1.0) and bad == pytest.approx(0.5)


def test_precision_recall_curve_averages_to_ap(coco):
    preds = [[("cat", (12, 10, 50, 50))], []]  # as in the half-recall test above
    curve = metrics.precision_recall(preds, GT)
    assert curve["recall"].shape == curve["precision"].shape == (101,)
    np.testing.assert_allclose(curve["precision"][:51], 0.5)  # cat 1, dog 0 up to recall 0.5
    np.testing.assert_allclose(curve["precision"][51:], 0.0)
    assert curve["precision"].mean() == pytest.approx(metrics.detection_map(preds, GT)["map50"])
    with pytest.raises(ValueError, match="iou"):
        metrics.precision_recall(preds, GT, iou=0.52)


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("humans", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_averages_min_matches_over_3_leaving_one_human_out(humans, expected):
    # k of 10 humans agree: k subsets of 9 hold k-1 of them, 10-k subsets hold k.
    answers = ["2"] * humans + ["3"] * (10 - humans)
    assert metrics.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_with_other_than_ten_answers_is_min_matches_over_3():
    assert metrics.vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert metrics.vqa_accuracy("cat", ["cat"] * 5) == 1.0


def test_vqa_answers_are_normalised_when_humans_disagree():
    answers = ["2"] * 9 + ["two dogs"]
    assert metrics.vqa_accuracy("Two!", answers) == 1.0


def test_vqa_answers_are_not_normalised_when_humans_agree():
    # The official script's quirk, kept; always_normalize=True lifts it.
    assert metrics.vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert metrics.vqa_accuracy("Two", ["2"] * 10, always_normalize=True) == 1.0
    assert metrics.vqa_accuracy("  2\n", ["2"] * 10) == 1.0  # whitespace always stripped


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs!", "2 dogs"),
        ("the cat's toy.", "cat's toy"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),
        ("yes , it is", "yes it is"),
        ("An apple", "apple"),
        ("None", "0"),
    ],
)
def test_normalize_vqa_answer(raw, normalised):
    assert metrics.normalize_vqa_answer(raw) == normalised


def test_exact_match():
    assert metrics.exact_match(" cat ", ["dog", "cat"]) == 1.0
    assert metrics.exact_match("Cat", "cat") == 0.0
    assert metrics.exact_match("Cat", "cat", ignore_case=True) == 1.0


# ----------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3


def test_anls_exact_answer_is_one():
    assert metrics.anls("42 Main St.", ["42 main st."]) == 1.0


def test_anls_one_edit_in_twelve_characters():
    assert metrics.anls("hello world", "Hello world!") == pytest.approx(1 - 1 / 12)


def test_anls_below_threshold_is_zero():
    assert metrics.anls("abc", ["xyz"]) == 0.0
    assert metrics.anls("abcd", ["abxy"]) == 0.0  # nl = 0.5 is not < 0.5


def test_anls_takes_the_best_reference():
    assert metrics.anls("cat", ["dog", "cats"]) == pytest.approx(0.75)


def test_anls_empty_strings():
    assert metrics.anls("", [""]) == 1.0
    assert metrics.anls("x", [""]) == 0.0


# ----------------------------------------------------------------------------- captions


def test_caption_tokens_are_lower_case_words_without_punctuation():
    assert metrics.caption_tokens("A dog's ball, isn't it?") == [
        "a",
        "dog",
        "'s",
        "ball",
        "is",
        "n't",
        "it",
    ]


def test_cider_of_perfect_captions_on_two_images_is_five():
    # N = 2 images, idf = log 2 - log df. "a" is in both reference sets (weight 0);
    # "cat" / "a cat" in one (weight log 2). Cosine 1 for 1- and 2-grams, 3- and
    # 4-grams are empty (0): mean (1 + 1 + 0 + 0) / 4 = 0.5, times 10.
    assert metrics.cider(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)


def test_cider_of_a_wrong_caption_is_zero():
    score, per_example = metrics.cider(["a dog", "a dog"], [["a cat"], ["a dog"]], per_example=True)
    assert per_example == pytest.approx([0.0, 5.0])
    assert score == pytest.approx(2.5)


def test_cider_clips_repeated_words_and_penalises_length():
    # "a cat cat" vs "a cat", L = log 2: 1-grams p = (a: 0, cat: 2L), r = (cat: L):
    # min(2L, L) L / (2L * L) = 1/2. 2-grams p = ("a cat": L, "cat cat": L), r = ("a cat": L):
    # L^2 / (sqrt(2) L * L) = 1/sqrt(2). Lengths (in bigrams) 2 vs 1: exp(-1 / 72).
    expected = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    _, per_example = metrics.cider(["a cat cat", "a dog"], [["a cat"], ["a dog"]], per_example=True)
    assert per_example[0] == pytest.approx(expected)


def test_cider_averages_over_references():
    _, per_example = metrics.cider(
        ["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]], per_example=True
    )
    # image 1: df(cat) = 1, df(dog) = 2 -> "dog" weighs 0; vs "a cat": 5.0; vs "a dog": 1-gram
    # vectors are all 0 (no similarity), 2-gram "a cat" vs "a dog": 0 -> 0. Mean 2.5.
    assert per_example[0] == pytest.approx(2.5)


def test_cider_of_a_single_image_is_zero():
    assert metrics.cider(["a cat"], [["a cat"]]) == 0.0


def test_bleu_of_identical_captions_is_100():
    pytest.importorskip("sacrebleu")
    assert metrics.bleu(["a cat sits on the mat"], [["a cat sits on the mat"]]) == pytest.approx(
        100.0
    )


def test_bleu_takes_any_number_of_references():
    pytest.importorskip("sacrebleu")
    score = metrics.bleu(
        ["a cat sits on the mat", "a dog runs in the park"],
        [["a cat sits on the mat", "there is a cat"], ["a dog runs in the park"]],
    )
    assert score == pytest.approx(100.0)
    assert metrics.bleu(["a b c d"], [["w x y z"]]) < 1.0
