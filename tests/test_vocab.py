"""Specification of pali_kit.vocab: the one owner of the <loc>/<seg> vocabulary.

The tokenizer (normalised boxes, y first) and detection (pixel boxes, x first)
both convert through it; these tests pin the bin convention and check that the
two box orders give the same tokens for the same box.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pali_kit import detection, tokenizer, vocab

FUZZ = settings(max_examples=200, deadline=None)


def test_every_bin_round_trips_exactly():
    for scale in (1024, 1023):
        assert [
            vocab.to_bin(vocab.from_bin(b, scale), scale) for b in range(vocab.NUM_LOC)
        ] == list(range(vocab.NUM_LOC))


@pytest.mark.parametrize(
    "v, b", [(0.0, 0), (0.5 / 1024, 0), (1.5 / 1024, 2), (1.0, 1023), (-0.2, 0)]
)
def test_to_bin_rounds_half_to_even_and_clips(v, b):
    assert vocab.to_bin(v) == b


@FUZZ
@given(st.floats(0, 1))
def test_a_coordinate_moves_by_at_most_half_a_bin(v):
    back = vocab.from_bin(vocab.to_bin(v))
    # half a bin, except the clipped last bin; plus float64 rounding of values <= 1
    assert abs(back - v) <= (1 / 1024 if v > 1023.5 / 1024 else 0.5 / 1024) + 1e-12


@FUZZ
@given(st.lists(st.integers(0, vocab.NUM_LOC - 1), min_size=4, max_size=4))
def test_loc_text_parses_back_to_the_same_bins(bins):
    text = vocab.loc_text(bins)
    assert [int(b) for b in vocab.LOC_RE.findall(text)] == bins
    assert tokenizer.loc_tokens_to_box(text) == tuple(b / 1024 for b in bins)


@FUZZ
@given(st.lists(st.integers(0, vocab.NUM_SEG - 1), min_size=16, max_size=16))
def test_seg_text_parses_back_to_the_same_codes(codes):
    assert [int(c) for c in vocab.SEG_RE.findall(vocab.seg_text(codes))] == codes


@FUZZ
@given(
    st.integers(1, 4000),
    st.integers(1, 4000),
    st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_pixel_x_first_and_normalised_y_first_boxes_give_the_same_tokens(width, height, f):
    """detection.box_to_loc((x0, y0, x1, y1), W, H) == tokenizer.box_to_loc_tokens((y0/H, x0/W, ...))."""
    x0, y0, x1, y1 = f[0] * width, f[1] * height, f[2] * width, f[3] * height
    pixels = detection.box_to_loc((x0, y0, x1, y1), width, height)
    normalised = tokenizer.box_to_loc_tokens(
        (min(y0 / height, 1.0), min(x0 / width, 1.0), min(y1 / height, 1.0), min(x1 / width, 1.0))
    )
    assert pixels == normalised
    # and the parser reads them back x first (inverted boxes swapped), within half a bin of
    # the side (a whole bin for the clipped last one), plus float64 rounding at this scale
    (det,) = detection.parse_detections(pixels + " thing", width, height)
    want = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    for got, w, side in zip(det.box, want, (width, height, width, height)):
        assert abs(got - w) <= side / 1024 + 1e-12 * side


def test_pieces_are_the_1152_tokens_in_vocabulary_order():
    pieces = vocab.pieces()
    assert len(pieces) == vocab.NUM_LOC + vocab.NUM_SEG == 1152
    assert pieces[0] == "<loc0000>" and pieces[1023] == "<loc1023>"
    assert pieces[1024] == "<seg000>" and pieces[-1] == "<seg127>"
    assert all(re.fullmatch(r"<loc\d{4}>|<seg\d{3}>", p) for p in pieces)


def test_one_definition_of_the_vocabulary_sizes():
    assert tokenizer.NUM_LOC is vocab.NUM_LOC and tokenizer.NUM_SEG is vocab.NUM_SEG
    assert detection.NUM_LOC is vocab.NUM_LOC and detection.SEG_TOKENS_PER_MASK == 16
