"""The tokenizer: PaliGemma id scheme, prompt/example layouts with their masks, boxes."""

from __future__ import annotations

import importlib.util
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pali_kit import tokenizer as ptok
from pali_kit.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
DEMO_FILE = REPO / "data" / "tokenizer.model"
FUZZ = settings(max_examples=100, deadline=None)

# Demo tokenizer ids used in the literal expectations below.
PAD, EOS, BOS, NL = 0, 1, 2, 4
CAPTION_EN = [374, 288]  # "caption" "▁en"
A_RED_CIRCLE = [964, 310, 286]  # "a" "▁red" "▁circle"
DETECT_CIRCLE_SQUARE = [346, 286, 321, 285]  # "detect" "▁circle" "▁;" "▁square"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.demo()


@pytest.fixture(scope="module")
def pb():
    return pytest.importorskip("sentencepiece.sentencepiece_model_pb2")


def _proto(pb, data: bytes | None = None):
    return pb.ModelProto.FromString(data if data is not None else DEMO_FILE.read_bytes())


def _make_tokenizer_script():
    spec = importlib.util.spec_from_file_location(
        "make_tokenizer", REPO / "scripts" / "make_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------
# Id scheme


def test_demo_tokenizer_has_the_paligemma_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]


def test_demo_tokenizer_puts_loc_and_seg_pieces_last(tok):
    assert tok.vocab_size == len(tok) == 2176
    assert (tok.loc_offset, tok.seg_offset) == (1024, 2048)
    assert tok.loc_ids == range(1024, 2048) and tok.seg_ids == range(2048, 2176)
    assert tok.id_to_piece(tok.loc_id(0)) == "<loc0000>"
    assert tok.id_to_piece(tok.loc_id(1023)) == "<loc1023>"
    assert tok.id_to_piece(tok.seg_id(0)) == "<seg000>"
    assert tok.id_to_piece(tok.seg_id(127)) == "<seg127>" and tok.seg_id(127) == tok.vocab_size - 1


def test_newline_is_one_dedicated_piece(tok):
    assert tok.newline_ids == (NL,)
    assert tok.id_to_piece(NL) == "\n"
    assert tok.encode("a\n\nb") == [964, NL, NL, tok.encode("b")[0]]


def test_loc_and_seg_text_encodes_to_their_ids(tok):
    assert tok.encode("<loc0007><loc1023><seg042>") == [1031, 2047, 2090]
    assert tok.piece_to_id("<loc0500>") == tok.loc_id(500)


def test_is_loc_and_is_seg_classify_ids_and_arrays(tok):
    assert tok.is_loc(1024) and tok.is_loc(2047) and not tok.is_loc(1023) and not tok.is_loc(2048)
    assert tok.is_seg(2048) and tok.is_seg(2175) and not tok.is_seg(2047)
    ids = np.array([[2, 1024, 2048], [1, 2047, 5]])
    np.testing.assert_array_equal(tok.is_loc(ids), [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(tok.is_seg(ids), [[False, False, True], [False, False, False]])


@pytest.mark.parametrize(
    "call", [lambda t: t.loc_id(1024), lambda t: t.loc_id(-1), lambda t: t.seg_id(128)]
)
def test_loc_and_seg_indices_out_of_range_raise(tok, call):
    with pytest.raises(ValueError, match="not in"):
        call(tok)


def test_unknown_piece_raises_key_error(tok):
    with pytest.raises(KeyError, match="not a piece"):
        tok.piece_to_id("<no such piece>")
    assert tok.piece_to_id("<unk>") == 3


def test_official_vocab_size_gives_loc_at_256000_and_seg_at_257024(pb):
    # A stand-in for paligemma_tokenizer.model: the demo base pieces, UNUSED
    # fillers up to 256,000, then the demo's 1152 <loc>/<seg> pieces.
    model = _proto(pb)
    base, extra = list(model.pieces[:1024]), list(model.pieces[1024:])
    del model.pieces[:]
    model.pieces.extend(base)
    for i in range(256_000 - 1024):
        model.pieces.add(piece=f"<filler{i}>", type=pb.ModelProto.SentencePiece.UNUSED)
    model.pieces.extend(extra)
    tok = Tokenizer.from_bytes(model.SerializeToString(), "official-size")
    assert tok.vocab_size == 257_152
    assert [tok.loc_id(i) for i in (0, 1, 1023)] == [256_000, 256_001, 257_023]
    assert [tok.seg_id(j) for j in (0, 127)] == [257_024, 257_151]
    assert tok.is_loc(256_000) and not tok.is_loc(255_999) and tok.is_seg(257_151)
    assert tok.encode("<loc0000><seg127>") == [256_000, 257_151]


# ----------------------------------------------------------------------------
# Loading errors and the demo file


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_non_sentencepiece_file_raises_naming_the_file(tmp_path):
    path = tmp_path / "notes.model"
    path.write_text("this is not a SentencePiece model")
    with pytest.raises(ValueError, match=r"notes\.model is not a SentencePiece model"):
        Tokenizer(path)


def test_model_without_loc_and_seg_pieces_raises_naming_the_file(tmp_path, pb):
    model = _proto(pb)
    del model.pieces[1024:]  # a plain "Gemma-like" base model
    path = tmp_path / "gemma_like.model"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(
        ValueError, match=r"gemma_like\.model: 1024 pieces, too few .* not a plain Gemma one"
    ):
        Tokenizer(path)


def test_seg_pieces_before_loc_pieces_raise(pb):
    model = _proto(pb)
    base, loc, seg = (
        list(model.pieces[:1024]),
        list(model.pieces[1024:2048]),
        list(model.pieces[2048:]),
    )
    del model.pieces[:]
    model.pieces.extend(base + seg + loc)
    with pytest.raises(ValueError, match="swapped: id 1024 is '<seg000>', expected '<loc0000>'"):
        Tokenizer.from_bytes(model.SerializeToString(), "swapped")


def _tiny_model_with_loc_seg(pb, **options) -> bytes:
    """A SentencePiece model trained with SentencePiece's defaults, plus <loc>/<seg>."""
    out = io.BytesIO()
    lines = ["a red circle", "a blue square"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=18,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    model = _proto(pb, out.getvalue())
    model.pieces.extend(list(_proto(pb).pieces[1024:]))
    return model.SerializeToString()


def test_sentencepiece_default_special_ids_raise(pb):
    # SentencePiece's defaults are unk 0, bos 1, eos 2 and no pad.
    data = _tiny_model_with_loc_seg(pb)
    with pytest.raises(
        ValueError, match="defaults: pad id is -1, PaliGemma uses 0: not a PaliGemma"
    ):
        Tokenizer.from_bytes(data, "defaults")


def test_normalizer_that_drops_newlines_raises(pb):
    # The default "nmt_nfkc" normalization drops a lone "\n".
    data = _tiny_model_with_loc_seg(pb, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    with pytest.raises(ValueError, match="nfkc: its normalizer does not keep '\\\\n'"):
        Tokenizer.from_bytes(data, "nfkc")


def test_demo_reads_PALI_KIT_DATA(tmp_path, monkeypatch):
    shutil.copy(DEMO_FILE, tmp_path / "tokenizer.model")
    monkeypatch.setenv("PALI_KIT_DATA", str(tmp_path))
    assert Tokenizer.demo().path == str(tmp_path / "tokenizer.model")


def test_demo_without_the_file_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PALI_KIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)tokenizer\.model.*PALI_KIT_DATA"):
        Tokenizer.demo()


def test_demo_file_is_small_and_exactly_what_the_script_builds():
    data = DEMO_FILE.read_bytes()
    assert len(data) < 300_000
    assert _make_tokenizer_script().build() == data


def test_tokenizer_is_exported_by_the_package():
    import pali_kit as pk

    assert pk.Tokenizer is Tokenizer


# ----------------------------------------------------------------------------
# encode / decode


def test_encode_adds_no_bos_or_eos(tok):
    assert tok.encode("caption en") == CAPTION_EN
    assert tok.encode("a red circle") == A_RED_CIRCLE
    assert tok.encode("detect circle ; square") == DETECT_CIRCLE_SQUARE
    assert tok.encode("") == []


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"caption en")


def test_decode_keeps_loc_and_seg_tokens_as_text(tok):
    ids = [tok.loc_id(12), tok.loc_id(500), tok.loc_id(80), tok.loc_id(900), *tok.encode(" circle")]
    ids += [tok.seg_id(3), tok.seg_id(127)]
    assert tok.decode(ids) == "<loc0012><loc0500><loc0080><loc0900> circle<seg003><seg127>"


def test_decode_stops_at_the_first_eos_and_drops_pad(tok):
    ids = [*A_RED_CIRCLE[:2], PAD, A_RED_CIRCLE[2], EOS, *tok.encode(" junk"), EOS, PAD]
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(np.array(ids, np.int32)) == "a red circle"


def test_decode_past_eos_when_asked(tok):
    assert (
        tok.decode([*A_RED_CIRCLE, EOS, *tok.encode(" more")], stop_at_eos=False)
        == "a red circle more"
    )


def test_decode_batch_decodes_each_row(tok):
    rows = np.array([[*A_RED_CIRCLE, EOS], [*CAPTION_EN, PAD, PAD]])
    assert tok.decode_batch(rows) == ["a red circle", "caption en"]


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=r"token id 2176 is outside the vocabulary \[0, 2176\)"):
        tok.decode([5, 2176])
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode([[5, 6]])


@FUZZ
@given(st.text(max_size=40).filter(lambda s: "\u2581" not in s))
def test_any_text_round_trips_without_unk(tok, text):
    # "▁" (U+2581) is SentencePiece's space marker, so it decodes as " ".
    ids = tok.encode(text)
    assert 3 not in ids  # byte fallback: no <unk>
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------
# Inference prompts: [BOS] prefix "\n" (suffix), no EOS


def test_prompt_is_bos_prefix_newline_all_prefix(tok):
    row = tok.encode_prompt("answer en what color is the circle")
    expected = [BOS, *tok.encode("answer en what color is the circle"), *tok.newline_ids]
    np.testing.assert_array_equal(row["text"], expected)
    np.testing.assert_array_equal(row["mask_ar"], [0] * len(expected))
    np.testing.assert_array_equal(row["mask_input"], [True] * len(expected))


def test_prompt_batch_literal_arrays(tok):
    batch = tok.encode_prompts(["caption en", "detect circle ; square"])
    assert batch["text"].dtype == np.int32 and batch["mask_ar"].dtype == np.int32
    assert batch["mask_input"].dtype == bool
    np.testing.assert_array_equal(
        batch["text"],
        [
            [2, 374, 288, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [2, 346, 286, 321, 285, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        batch["mask_ar"],
        [
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ],
    )
    np.testing.assert_array_equal(batch["mask_input"].sum(1), [4, 6])
    np.testing.assert_array_equal(batch["mask_input"], batch["text"] != 0)


def test_prompt_suffix_is_a_forced_continuation_with_mask_ar_1(tok):
    row = tok.encode_prompt("caption en", suffix="a red circle", text_len=10)
    np.testing.assert_array_equal(row["text"], [BOS, *CAPTION_EN, NL, *A_RED_CIRCLE, 0, 0, 0])
    np.testing.assert_array_equal(row["mask_ar"], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(row["mask_input"], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_prompts_with_some_suffixes(tok):
    batch = tok.encode_prompts(
        ["caption en", "caption en"], suffixes=[None, "a red circle"], bucket=None
    )
    assert batch["text"].shape == (2, 7)
    np.testing.assert_array_equal(batch["mask_ar"], [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch["mask_input"].sum(1), [4, 7])


@pytest.mark.parametrize(
    "bucket, width", [(16, 16), (8, 8), (5, 10), (1, 6), (None, 6), ("pow2", 8)]
)
def test_prompt_batch_pads_to_the_longest_rounded_up_to_the_bucket(tok, bucket, width):
    batch = tok.encode_prompts(
        ["caption en", "detect circle ; square"], bucket=bucket
    )  # 4 and 6 tokens
    assert batch["text"].shape == (2, width)


def test_text_len_fixes_the_width_whatever_the_bucket(tok):
    assert tok.encode_prompts(["caption en"], text_len=37, bucket=16)["text"].shape == (1, 37)


def test_prompt_longer_than_text_len_raises_saying_how_long_it_is(tok):
    with pytest.raises(
        ValueError, match=r"prompts\[1\] is 6 tokens long .* text_len=5: pass text_len >= 6"
    ):
        tok.encode_prompts(["caption en", "detect circle ; square"], text_len=5)


def test_prompt_longer_than_text_len_is_cut_with_a_warning_when_asked(tok):
    with pytest.warns(UserWarning, match="1 prompt"):
        batch = tok.encode_prompts(["detect circle ; square"], text_len=3, truncate=True)
    np.testing.assert_array_equal(batch["text"], [[BOS, *DETECT_CIRCLE_SQUARE[:2]]])
    np.testing.assert_array_equal(batch["mask_input"], [[True, True, True]])


def test_one_string_is_a_batch_of_one(tok):
    assert tok.encode_prompts("caption en")["text"].shape == (1, 16)


def test_non_string_prompt_raises_type_error_naming_its_index(tok):
    with pytest.raises(TypeError, match=r"prompts\[1\] is a int"):
        tok.encode_prompts(["caption en", 3])


def test_empty_prompt_batch_raises(tok):
    with pytest.raises(ValueError, match="prompts is empty"):
        tok.encode_prompts([])


def test_prompt_suffix_count_must_match(tok):
    with pytest.raises(ValueError, match="2 prompts but 1 suffixes"):
        tok.encode_prompts(["caption en", "ocr"], suffixes=["a"])


@pytest.mark.parametrize("bucket", [0, -16, "pow3", 2.5])
def test_bad_bucket_raises(tok, bucket):
    with pytest.raises(ValueError, match="bucket must be"):
        tok.encode_prompts(["caption en"], bucket=bucket)


# ----------------------------------------------------------------------------
# Training examples: [BOS] prefix "\n" suffix [EOS], text_len + 1 columns


def test_training_example_is_prefix_newline_suffix_eos_tokenized_separately(tok):
    prefix, suffix = "answer en how many shapes are there", "3"
    row = tok.encode_example(prefix, suffix, text_len=16)
    head = [BOS, *tok.encode(prefix), *tok.newline_ids]
    tail = [*tok.encode(suffix), EOS]
    pad = 17 - len(head) - len(tail)
    np.testing.assert_array_equal(row["text"], head + tail + [0] * pad)
    np.testing.assert_array_equal(row["mask_ar"], [0] * len(head) + [1] * len(tail) + [1] * pad)
    np.testing.assert_array_equal(row["mask_loss"], [0] * len(head) + [1] * len(tail) + [0] * pad)
    np.testing.assert_array_equal(row["mask_input"], [1] * (len(head) + len(tail)) + [0] * pad)


def test_training_batch_literal_arrays(tok):
    batch = tok.encode_examples(["caption en", "caption en"], ["a red circle", ""], text_len=9)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "text": ((2, 10), np.int32),
        "mask_ar": ((2, 10), np.int32),
        "mask_loss": ((2, 10), np.int32),
        "mask_input": ((2, 10), bool),
    }
    np.testing.assert_array_equal(
        batch["text"],
        [[2, 374, 288, 4, 964, 310, 286, 1, 0, 0], [2, 374, 288, 4, 1, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        batch["mask_ar"], [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(
        batch["mask_loss"], [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(batch["mask_input"].sum(1), [8, 5])


def test_long_example_keeps_its_first_text_len_plus_one_tokens_and_warns(tok):
    with pytest.warns(UserWarning, match="EOS is lost"):
        row = tok.encode_example("caption en", "a red circle", text_len=5)
    np.testing.assert_array_equal(row["text"], [BOS, *CAPTION_EN, NL, 964, 310])
    np.testing.assert_array_equal(row["mask_loss"], [0, 0, 0, 0, 1, 1])


def test_long_example_raises_when_truncation_is_off(tok):
    with pytest.raises(ValueError, match=r"example 0 is 8 tokens .* pass text_len >= 7"):
        tok.encode_example("caption en", "a red circle", text_len=5, truncate=False)


def test_example_whose_prefix_fills_the_row_raises(tok):
    with pytest.raises(ValueError, match="example 1: BOS \\+ prefix \\+ '\\\\n' is 4 tokens"):
        tok.encode_examples(["ocr", "caption en"], ["x", "y"], text_len=3)


def test_example_inputs_are_checked(tok):
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        tok.encode_examples(["a", "b"], ["c"], text_len=8)
    with pytest.raises(TypeError, match=r"suffixes\[0\] is a NoneType"):
        tok.encode_examples(["a"], [None], text_len=8)
    with pytest.raises(ValueError, match="text_len must be a positive int"):
        tok.encode_examples(["a"], ["b"], text_len=0)


# ----------------------------------------------------------------------------
# Fuzzing: masks stay consistent for any text

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["", "\n", "caption en", "a\nb", " ", "<loc0001> circle", "日本語 ✓"]
)


def _check_common(batch, rows, width):
    text, ar, real = batch["text"], batch["mask_ar"], batch["mask_input"]
    assert text.shape == ar.shape == real.shape == (rows, width)
    n = real.sum(1)
    for b in range(rows):
        assert real[b, : n[b]].all() and not real[b, n[b] :].any()  # a prefix of ones
        assert (text[b, n[b] :] == 0).all() and (ar[b, n[b] :] == 1).all()
        assert (np.diff(ar[b, : n[b]]) >= 0).all()  # 0...0 then 1...1
        assert text[b, 0] == BOS and ar[b, 0] == 0


@FUZZ
@given(
    prefixes=st.lists(_text, min_size=1, max_size=3),
    suffixes=st.data(),
    text_len=st.integers(1, 40),
)
def test_fuzz_training_masks_are_consistent(tok, prefixes, suffixes, text_len):
    suffixes = suffixes.draw(st.lists(_text, min_size=len(prefixes), max_size=len(prefixes)))
    heads = [1 + len(tok.encode(p)) + 1 for p in prefixes]
    if max(heads) >= text_len + 1:
        with pytest.raises(ValueError, match="leaves no room for the suffix"):
            tok.encode_examples(prefixes, suffixes, text_len=text_len)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tok.encode_examples(prefixes, suffixes, text_len=text_len)
    _check_common(batch, len(prefixes), text_len + 1)
    loss, ar, real = batch["mask_loss"], batch["mask_ar"], batch["mask_input"]
    assert (loss <= ar).all() and (loss <= real).all()
    for b, (p, s) in enumerate(zip(prefixes, suffixes)):
        full = [BOS, *tok.encode(p), NL, *tok.encode(s), EOS][: text_len + 1]
        np.testing.assert_array_equal(batch["text"][b, : len(full)], full)
        assert real[b].sum() == len(full)
        assert loss[b].sum() == len(full) - heads[b]  # loss on every kept suffix token


@FUZZ
@given(
    prompts=st.lists(_text, min_size=1, max_size=4),
    suffix=_text,
    bucket=st.sampled_from([None, 1, 8, 16, "pow2"]),
)
def test_fuzz_prompt_masks_are_consistent(tok, prompts, suffix, bucket):
    suffixes = [suffix] + [None] * (len(prompts) - 1)
    batch = tok.encode_prompts(prompts, suffixes=suffixes, bucket=bucket)
    lengths = [2 + len(tok.encode(p)) for p in prompts]
    lengths[0] += len(tok.encode(suffix))
    width = batch["text"].shape[1]
    assert width >= max(lengths) and width == ptok._bucket_length(max(lengths), bucket)
    _check_common(batch, len(prompts), width)
    np.testing.assert_array_equal(batch["mask_input"].sum(1), lengths)
    for b, p in enumerate(prompts):
        head = [BOS, *tok.encode(p), NL]
        np.testing.assert_array_equal(batch["text"][b, : len(head)], head)
        assert (batch["mask_ar"][b, : len(head)] == 0).all()
        assert (batch["mask_ar"][b, len(head) :] == 1).all()


# ----------------------------------------------------------------------------
# Task prompts


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (ptok.caption(), "caption en"),
        (ptok.caption("de"), "caption de"),
        (ptok.cap("fil"), "cap fil"),
        (ptok.describe("fr"), "describe fr"),
        (ptok.ocr(), "ocr"),
        (ptok.answer("how many shapes are there"), "answer en how many shapes are there"),
        (ptok.answer("what color is the circle", lang="es"), "answer es what color is the circle"),
        (ptok.question("red"), "question en red"),
        (ptok.detect("circle", "square"), "detect circle ; square"),
        (ptok.detect(["circle", "square"]), "detect circle ; square"),
        (ptok.segment("triangle"), "segment triangle"),
    ],
)
def test_task_prompt_builders(prompt, expected):
    assert prompt == expected


def test_languages_are_the_35_codes_of_coco35l():
    assert len(ptok.LANGUAGES) == len(set(ptok.LANGUAGES)) == 35
    assert {"en", "de", "fr", "es", "zh", "fil"} <= set(ptok.LANGUAGES)


def test_unknown_language_raises_listing_the_codes():
    with pytest.raises(ValueError, match="unknown language code 'english': use one of ar, bn, "):
        ptok.caption("english")


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: ptok.detect(), ValueError),
        (lambda: ptok.detect("cat ; dog"), ValueError),
        (lambda: ptok.segment("  "), ValueError),
        (lambda: ptok.detect("cat", 3), TypeError),
        (lambda: ptok.answer(""), ValueError),
    ],
)
def test_bad_prompt_arguments_raise(call, error):
    with pytest.raises(error):
        call()


# ----------------------------------------------------------------------------
# Boxes <-> <loc> tokens: bin = round(v * 1024) (half to even) clipped to 1023, v = bin / 1024


def test_box_to_loc_tokens_literal():
    assert ptok.box_to_loc_tokens((0.1, 0.25, 0.5, 1.0)) == "<loc0102><loc0256><loc0512><loc1023>"
    assert (
        ptok.box_to_loc_tokens((0, 0, 0.5 / 1024, 1.5 / 1024))
        == "<loc0000><loc0000><loc0000><loc0002>"
    )
    assert ptok.loc_tokens_to_box("<loc0102><loc0256><loc0512><loc1023>") == (
        102 / 1024,
        0.25,
        0.5,
        1023 / 1024,
    )


def test_box_tokens_encode_to_loc_ids(tok):
    ids = tok.encode(tok.box_to_loc_tokens((0.1, 0.25, 0.5, 1.0)))
    assert ids == [tok.loc_id(102), tok.loc_id(256), tok.loc_id(512), tok.loc_id(1023)]
    assert tok.is_loc(ids).all()


@FUZZ
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_box_round_trip_moves_a_coordinate_by_at_most_half_a_bin(box):
    back = ptok.loc_tokens_to_box(ptok.box_to_loc_tokens(box))
    for v, w in zip(box, back):
        # quantisation (half a bin; the last bin is clipped) plus float64 rounding of values <= 1
        assert abs(v - w) <= (1 / 1024 if v > 1023.5 / 1024 else 0.5 / 1024) + 1e-12


@FUZZ
@given(st.lists(st.integers(0, 224), min_size=4, max_size=4))
def test_pixel_box_round_trips_exactly_at_224_px(pixels):
    back = ptok.loc_tokens_to_box(ptok.box_to_loc_tokens([p / 224 for p in pixels]))
    assert all(abs(w * 224 - p) < 0.25 for p, w in zip(pixels, back))
    assert [round(w * 224) for w in back] == pixels


@pytest.mark.parametrize(
    "box", [(10, 20, 100, 200), (0.1, 0.2, 1.01, 0.5), (0.1, float("nan"), 0.2, 0.3)]
)
def test_box_outside_the_unit_square_raises(box):
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        ptok.box_to_loc_tokens(box)


@pytest.mark.parametrize(
    "text", ["<loc0001><loc0002><loc0003>", "<loc0001><loc0002><loc0003><seg004>", "box"]
)
def test_malformed_loc_tokens_raise(text):
    with pytest.raises(ValueError, match="exactly four <locXXXX> tokens"):
        ptok.loc_tokens_to_box(text)
