"""Every mistake gets a clear error from the kit itself; nothing is silently wrong.

The catalogue ``CASES`` below is the list of bad inputs the kit handles. Each case
is checked for its error type and for naming the argument; ``docs/errors.md`` is
rendered from the same list (``python tests/test_errors.py`` rewrites it) and a test
fails when the two drift apart.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pali_kit as pk
from pali_kit import cli, decode, errors
from pali_kit.api import Generation
from pali_kit.assets import asset_dir
from pali_kit.detection import parse_detections
from pali_kit.segmentation import load_vae, reconstruct_masks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "errors.md"
IMAGE = str(asset_dir() / "images" / "shapes_0.png")


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the random-model fallback warns: must not happen
        return pk.load("demo", verbose=False)


def _load_demo(**kw):
    return pk.load("demo", verbose=False, **kw)


def _mask(model, allowed):
    mask = np.zeros(model.config.llm.vocab_size, bool)
    mask[list(allowed)] = True
    return mask


def _bomb(tmp: Path) -> str:
    """A 20000 x 20000 PNG (49 kB): over PIL's decompression-bomb limit."""
    path = tmp / "huge.png"
    PIL.Image.new("1", (20000, 20000)).save(path)
    return str(path)


def _cli(*argv):
    """Run the CLI; (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(argv))
    return status, err.getvalue()


def _folder_with_notes(tmp: Path) -> str:
    folder = tmp / "notes"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    return str(folder)


def _a_file(tmp: Path) -> str:
    path = tmp / "a_file.txt"
    path.write_text("mine")
    return str(path)


# --- the catalogue ---------------------------------------------------------------------------
# (what the user wrote, how to run it (model, tmp folder), the error type, words the message
# must contain: the argument's name and value). CLI cases give (exit status, word).

M = "model"
CASES = [
    # loading
    ('pk.load("demo", num_kv_heads=4)', lambda m, t: _load_demo(num_kv_heads=4),
     pk.CheckpointError, ["num_kv_heads=4"]),
    ('pk.load("demo", llm_depth=5)', lambda m, t: _load_demo(llm_depth=5),
     pk.CheckpointError, ["llm_depth=5"]),
    ('pk.load("demo", softcap=1.0)', lambda m, t: _load_demo(softcap=1.0),
     pk.ArgumentTypeError, ["softcap"]),
    ('pk.load("demo", final_logits_softcap="30")',
     lambda m, t: _load_demo(final_logits_softcap="30"), pk.ArgumentTypeError,
     ["final_logits_softcap='30'"]),
    ('pk.load("demo", dtype="int8")', lambda m, t: _load_demo(dtype="int8"),
     pk.ArgumentError, ["dtype='int8'"]),
    ("pk.load(model)", lambda m, t: pk.load(m), pk.ArgumentTypeError, ["source="]),
    ('pk.load("paligemma2-3b-pt-244")', lambda m, t: pk.load("paligemma2-3b-pt-244"),
     pk.UnknownNameError, ["paligemma2-3b-pt-244", "did you mean 'paligemma2-3b-pt-224'"]),
    ('pk.load("data/demo_model.npz", tokenizer="nothere.model")',
     lambda m, t: pk.load(str(asset_dir() / "demo_model.npz"), tokenizer="nothere.model"),
     pk.MissingFileError, ["tokenizer='nothere.model'"]),
    ("pk.Model(params, config).generate(IMAGE, 'x')  (no tokenizer)",
     lambda m, t: pk.Model(m.params, m.config).generate(IMAGE, "x"), pk.NoTokenizerError,
     ["tokenizer="]),
    ('pk.load("nothere.npz")', lambda m, t: pk.load("nothere.npz"),
     pk.MissingFileError, ["nothere.npz"]),
    # images and the float rule
    ("model.generate(np.full((1, 64, 64, 3), 200.0), ...)  (floats on 0..255)",
     lambda m, t: m.generate(np.full((1, 64, 64, 3), 200.0), "caption en"),
     pk.ImageError, ["[0, 1]", "[-1, 1]", "divide by 255"]),
    ("model.generate(np.full((8, 8, 3), -3.0), ...)",
     lambda m, t: m.generate(np.full((8, 8, 3), -3.0), "caption en"),
     pk.ImageError, ["[-1, 1]"]),
    ("model.generate(np.full((8, 8, 3), np.nan), ...)",
     lambda m, t: m.generate(np.full((8, 8, 3), np.nan), "caption en"),
     pk.ImageError, ["NaN"]),
    ("model.generate(None, ...)", lambda m, t: m.generate(None, "caption en"),
     pk.ImageError, ["NoneType"]),
    ("model.generate(a 20000 x 20000 PNG, ...)", lambda m, t: m.generate(_bomb(t), "x"),
     pk.ImageError, ["huge.png", "decompression bomb", "MAX_IMAGE_PIXELS"]),
    ('viz.draw_detections(image, "<loc0001>... cat")  (text, not parsed)',
     lambda m, t: pk.viz.draw_detections(np.zeros((8, 8, 3), np.uint8), "<loc0001> cat"),
     pk.ArgumentTypeError, ["detections=", "parse_detections"]),
    ("viz.draw_caption(image, None)",
     lambda m, t: pk.viz.draw_caption(np.zeros((8, 8, 3), np.uint8), None),
     pk.ArgumentTypeError, ["text=None"]),
    ("viz.to_pil(np.zeros((3, 8, 8)))  (channels first)",
     lambda m, t: pk.viz.to_pil(np.zeros((3, 8, 8))), pk.ImageError, ["(3, 8, 8)"]),
    ("viz.to_pil(np.full((8, 8, 3), 255.0))",
     lambda m, t: pk.viz.to_pil(np.full((8, 8, 3), 255.0)), pk.ImageError, ["[0, 1]"]),
    # prompts
    ("model.generate(IMAGE, None)", lambda m, t: m.generate(IMAGE, None),
     pk.ArgumentTypeError, ["prompts=None"]),
    ('model.generate(IMAGE, ["caption en", 3])', lambda m, t: m.generate(IMAGE, ["a", 3]),
     pk.ArgumentTypeError, ["prompts[1]=3"]),
    ("model.generate([IMAGE] * 2, ['a', 'b', 'c'])",
     lambda m, t: m.generate([IMAGE] * 2, ["a", "b", "c"]), pk.ArgumentError,
     ["2 images but 3 prompts"]),
    ('model.generate(IMAGE, "caption en " * 30)  (demo text_len 32)',
     lambda m, t: m.generate(IMAGE, "caption en " * 30), pk.PromptTooLongError,
     ["text_len=32", "never cut"]),
    ("model.generate(IMAGE, 'x', text_len=0)", lambda m, t: m.generate(IMAGE, "x", text_len=0),
     pk.ArgumentError, ["text_len=0"]),
    # generation keywords
    ("max_new_tokens=-5", lambda m, t: m.generate(IMAGE, "x", max_new_tokens=-5),
     pk.ArgumentError, ["max_new_tokens=-5"]),
    ("max_new_tokens=0", lambda m, t: m.generate(IMAGE, "x", max_new_tokens=0),
     pk.ArgumentError, ["max_new_tokens=0"]),
    ('max_new_tokens=0, sampler="beam(2)"',
     lambda m, t: m.generate(IMAGE, "x", max_new_tokens=0, sampler="beam(2)"),
     pk.ArgumentError, ["max_new_tokens=0"]),
    ("max_new_tokens=2.5", lambda m, t: m.generate(IMAGE, "x", max_new_tokens=2.5),
     pk.ArgumentTypeError, ["max_new_tokens=2.5"]),
    ('max_new_tokens="10"', lambda m, t: m.generate(IMAGE, "x", max_new_tokens="10"),
     pk.ArgumentTypeError, ["max_new_tokens='10'"]),
    ('sampler="top_k(5000)"', lambda m, t: m.generate(IMAGE, "x", sampler="top_k(5000)"),
     pk.SamplerError, ["sampler='top_k(5000)'", "2176"]),
    ('sampler="beam(5000)"', lambda m, t: m.generate(IMAGE, "x", sampler="beam(5000)"),
     pk.SamplerError, ["sampler='beam(5000)'", "2176"]),
    ('sampler="beam(0)"', lambda m, t: m.generate(IMAGE, "x", sampler="beam(0)"),
     pk.SamplerError, ["sampler='beam(0)'"]),
    ('sampler="top_k(2.5)"', lambda m, t: m.generate(IMAGE, "x", sampler="top_k(2.5)"),
     pk.SamplerError, ["sampler='top_k(2.5)'"]),
    ('sampler="temperature(0)"', lambda m, t: m.generate(IMAGE, "x", sampler="temperature(0)"),
     pk.SamplerError, ["sampler='temperature(0)'", "greedy"]),
    ('sampler="nucleus(1.5)"', lambda m, t: m.generate(IMAGE, "x", sampler="nucleus(1.5)"),
     pk.SamplerError, ["sampler='nucleus(1.5)'", "(0, 1]"]),
    ('sampler="nucleus(nan)"', lambda m, t: m.generate(IMAGE, "x", sampler="nucleus(nan)"),
     pk.SamplerError, ["sampler='nucleus(nan)'", "finite"]),
    ('sampler="gredy"', lambda m, t: m.generate(IMAGE, "x", sampler="gredy"),
     pk.SamplerError, ["sampler='gredy'", "did you mean 'greedy'"]),
    ("sampler=None", lambda m, t: m.generate(IMAGE, "x", sampler=None),
     pk.ArgumentTypeError, ["sampler=None"]),
    ('seed="a"', lambda m, t: m.generate(IMAGE, "x", seed="a"),
     pk.ArgumentTypeError, ["seed='a'"]),
    ("best_of=-3", lambda m, t: m.generate(IMAGE, "x", best_of=-3),
     pk.ArgumentError, ["best_of=-3"]),
    ('best_of=2, sampler="beam(2)"',
     lambda m, t: m.generate(IMAGE, "x", best_of=2, sampler="beam(2)"),
     pk.ArgumentError, ["best_of=2", "deterministic"]),
    ('cache_dtype="int8"', lambda m, t: m.generate(IMAGE, "x", cache_dtype="int8"),
     pk.ArgumentError, ["cache_dtype='int8'"]),
    ('cache_dtype="bool"', lambda m, t: m.generate(IMAGE, "x", cache_dtype="bool"),
     pk.ArgumentError, ["cache_dtype='bool'"]),
    ('cache_dtype="uint8"', lambda m, t: m.generate(IMAGE, "x", cache_dtype="uint8"),
     pk.ArgumentError, ["cache_dtype='uint8'"]),
    ("logit_mask=np.ones(5, bool)",
     lambda m, t: m.generate(IMAGE, "x", logit_mask=np.ones(5, bool)),
     pk.ArgumentError, ["logit_mask", "(5,)", "2176"]),
    ("logit_mask=np.zeros(V, bool)",
     lambda m, t: m.generate(IMAGE, "x", logit_mask=np.zeros(2176, bool)),
     pk.ArgumentError, ["logit_mask", "no token"]),
    ("logit_mask=np.ones(V) (floats)",
     lambda m, t: m.generate(IMAGE, "x", logit_mask=np.full(2176, 0.5)),
     pk.ArgumentTypeError, ["logit_mask"]),
    ("model.generate(IMAGE, 'x', temprature=0.7)",
     lambda m, t: m.generate(IMAGE, "x", temprature=0.7), pk.ArgumentTypeError,
     ["Model.generate()", "temprature=0.7"]),
    ("model.generate_tokens(..., foo=1)",
     lambda m, t: m.generate_tokens(IMAGE, [[2, 3]], [[True, True]], max_new_tokens=2, foo=1),
     pk.ArgumentTypeError, ["Model.generate_tokens()", "foo=1"]),
    ("model.generate_tokens(IMAGE, [[2, 3]], [[True]], ...)",
     lambda m, t: m.generate_tokens(IMAGE, [[2, 3]], [[True]], max_new_tokens=2),
     pk.ArgumentError, ["mask_input", "(1, 1)"]),
    ("model.generate_tokens(IMAGE, [[2, 99999]], ...)",
     lambda m, t: m.generate_tokens(IMAGE, [[2, 99999]], [[True, True]], max_new_tokens=2),
     pk.ArgumentError, ["text", "99999"]),
    ("model.logits(IMAGE, [[2, 3]], [[0.0, 1.0]])",
     lambda m, t: m.logits(IMAGE, [[2, 3]], [[0.0, 1.0]]), pk.ArgumentTypeError, ["mask_ar"]),
    ("model.stream([IMAGE, IMAGE], 'caption en')",
     lambda m, t: m.stream([IMAGE, IMAGE], "caption en"), pk.ArgumentError, ["2 images"]),
    ("model.stream(IMAGE, 'x', sampler='beam(2)')",
     lambda m, t: m.stream(IMAGE, "x", sampler="beam(2)"), pk.SamplerError,
     ["sampler='beam(2)'"]),
    ("model.stream(IMAGE, 'x', best_of=2)", lambda m, t: m.stream(IMAGE, "x", best_of=2),
     pk.ArgumentTypeError, ["Model.stream()", "best_of=2"]),
    # parsing and masks
    ("pk.parse_detections(generation, 64, 64)  (not its .text)",
     lambda m, t: parse_detections(Generation("p", "t", np.zeros(1), np.zeros(1)), 64, 64),
     pk.ArgumentTypeError, ["text=", ".text"]),
    ("pk.parse_detections(text, 0, 64)", lambda m, t: parse_detections("", 0, 64),
     pk.ArgumentError, ["width=0"]),
    ('pk.parse_detections(text, "64", 64)', lambda m, t: parse_detections("", "64", 64),
     pk.ArgumentTypeError, ["width='64'"]),
    ("pk.reconstruct_masks(codes, vae)  (swapped)",
     lambda m, t: reconstruct_masks([1] * 16, load_vae("demo")), pk.ArgumentTypeError,
     ["vae="]),
    ("pk.reconstruct_masks(vae, [0.5] * 16)",
     lambda m, t: reconstruct_masks(load_vae("demo"), [0.5] * 16), pk.ArgumentTypeError,
     ["indices="]),
    ("pk.reconstruct_masks(vae, [1] * 15)",
     lambda m, t: reconstruct_masks(load_vae("demo"), [1] * 15), pk.ArgumentError,
     ["indices", "(15,)"]),
    # the command line: (exit status, stderr)
    ("pali-kit info nonexistent", lambda m, t: _cli("info", "nonexistent"), 2,
     ["'nonexistent'"]),
    ("pali-kit generate IMAGE x --model paligemma2-3b-pt-244",
     lambda m, t: _cli("generate", IMAGE, "x", "--model", "paligemma2-3b-pt-244"), 2,
     ["did you mean"]),
    ("pali-kit generate IMAGE x --sampler 'top_k(9999)'",
     lambda m, t: _cli("generate", IMAGE, "x", "--sampler", "top_k(9999)"), 2, ["top_k(9999)"]),
    ("pali-kit generate nothere.png x", lambda m, t: _cli("generate", "nothere.png", "x"), 2,
     ["nothere.png"]),
    ("pali-kit generate  (no arguments)", lambda m, t: _cli("generate"), 2, ["required"]),
    ("pali-kit generate IMAGE x --quantize int3",
     lambda m, t: _cli("generate", IMAGE, "x", "--quantize", "int3"), 2, ["'int3'", "int4"]),
    ("pali-kit generate IMAGE x --dtype int8",
     lambda m, t: _cli("generate", IMAGE, "x", "--dtype", "int8"), 2, ["--quantize int8"]),
    ("pali-kit export-hf demo FOLDER  (non-empty, not an export)",
     lambda m, t: _cli("export-hf", "demo", _folder_with_notes(t)), 2, ["--force", "notes.txt"]),
    ("pali-kit export-hf demo FILE", lambda m, t: _cli("export-hf", "demo", _a_file(t)), 2,
     ["a_file.txt", "is a file"]),
]  # fmt: skip


def run_case(case, model, tmp: Path) -> tuple[str, str]:
    """-> (what the user sees: type or exit status, the one-line message)."""
    label, thunk, expected, words = case
    if isinstance(expected, int):  # a CLI case
        status, err = thunk(model, tmp)
        lines = [line for line in err.splitlines() if not line.startswith("pali_kit: ")]
        assert len(lines) == 1, (label, err)  # one line (status lines aside)
        assert "Traceback" not in err
        assert status == expected, (label, status, err)
        return f"exit {status}", lines[0]
    with pytest.raises(errors.PaliKitError) as info:
        out = thunk(model, tmp)
        if hasattr(out, "__next__"):
            next(out)
    error = info.value
    assert type(error) is expected or isinstance(error, expected), (label, type(error), error)
    return type(error).__name__, str(error)


def _clean(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "<tmp>").replace(str(asset_dir()), "<data>")
    text = text.replace(os.getcwd(), "<cwd>").replace(str(ROOT), ".")
    return text.replace("|", "\\|")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_gets_the_kits_error_naming_the_argument(case, model, tmp_path):
    _, message = run_case(case, model, tmp_path)
    for word in case[3]:
        assert word in message, (case[0], word, message)


def render_catalogue(model, tmp: Path) -> str:
    rows = []
    for case in CASES:
        kind, message = run_case(case, model, tmp)
        rows.append(f"| `{_clean(case[0], tmp)}` | {kind} | {_clean(message, tmp)} |")
    return CATALOGUE_HEAD + "\n".join(rows) + "\n"


CATALOGUE_HEAD = """# Errors: bad input -> what the user sees

Every mistake below ends in one of the kit's own exceptions (``pali_kit.errors``),
raised by the kit's code with a message that names the argument, its value, what
is allowed and what to do. They subclass the built-in types, so ``except
ValueError`` / ``TypeError`` / ``FileNotFoundError`` keep working:

| class | also a | for |
|---|---|---|
| `PaliKitError` | `Exception` | the base of all below |
| `ArgumentError` | `ValueError` | an argument's value is not allowed |
| `SamplerError` | `ArgumentError` | a sampler spec out of range or unknown |
| `PromptTooLongError` | `ArgumentError` | a prompt over `text_len` (prompts are never cut) |
| `UnknownNameError` | `ArgumentError`, `KeyError` | an unknown checkpoint name |
| `ImageError` | `ArgumentError` | an input that cannot be read as an image |
| `ArgumentTypeError` | `TypeError` | a wrong type, or a keyword the call does not take |
| `CheckpointError` | `ValueError` | a checkpoint (or override) that does not fit |
| `MissingFileError` | `FileNotFoundError` | a file that does not exist |
| `ExportFolderError` | `FileExistsError` | `export-hf` into a folder holding other files |
| `NoTokenizerError` | `RuntimeError` | text in or out with a model that has no tokenizer |

The command line prints one line, `pali-kit: error: ...`, on stderr and exits with
status 2 when the command line is wrong (usage, a value, an image, an unknown model,
an export target that needs `--force`) or 1 when running failed; `--debug` shows the
traceback. Status lines go to stderr, answers to stdout.

Float image arrays follow one rule everywhere (``pk.preprocess``, every Model call
that takes images, the prompt panel, ``viz``): finite values in [-1, 1]; with a
negative value the array is on the model's scale [-1, 1] (what ``pk.preprocess``
returns), otherwise an image in [0, 1].

This table is produced by ``tests/test_errors.py`` (``python tests/test_errors.py``
rewrites it; a test fails when it is out of date). `IMAGE` is a sample image path,
`V` = 2176 the demo vocabulary, `<data>` the kit's data folder, `<cwd>` the current one.

| input | raises | message |
|---|---|---|
"""


def test_docs_catalogue_is_up_to_date(model, tmp_path):
    assert DOCS.read_text() == render_catalogue(model, tmp_path), (
        "docs/errors.md is out of date: run `python tests/test_errors.py`"
    )


# --- the hierarchy ---------------------------------------------------------------------------


def test_the_kits_errors_keep_the_builtin_types_and_names():
    assert issubclass(pk.ArgumentError, ValueError) and issubclass(pk.SamplerError, ValueError)
    assert issubclass(pk.ArgumentTypeError, TypeError)
    assert issubclass(pk.MissingFileError, FileNotFoundError)
    assert issubclass(pk.UnknownNameError, KeyError) and issubclass(pk.UnknownNameError, ValueError)
    assert (
        pk.images.ImageError is pk.ImageError
        and pk.checkpoints.CheckpointError is pk.CheckpointError
    )
    assert str(pk.UnknownNameError("plain text")) == "plain text"  # not quoted like KeyError
    for name in errors.__all__:
        assert issubclass(getattr(pk, name), errors.PaliKitError)


# --- the silent cases now work correctly ------------------------------------------------------


def test_a_harmless_override_still_loads(model):
    changed = _load_demo(final_logits_softcap=30.0)
    assert changed.config.llm.final_logits_softcap == 30.0


def test_one_float_rule_in_preprocess_model_and_viz(model):
    """[0, 1] floats are an image, [-1, 1] floats with a negative value are model input;
    the same at the model's input shape as at any other shape."""
    uint8 = pk.images.load_image(IMAGE)
    x = model.preprocess(IMAGE)  # float32 [1, 64, 64, 3] in [-1, 1], has negatives
    assert x.min() < 0
    # Model input passed back in is unchanged: (x + 1) * 127.5 / 127.5 - 1 in float32 is x
    # up to one rounding of values of size <= 2, i.e. <= 2 * 2**-24 ~ 1.2e-7.
    np.testing.assert_allclose(model.preprocess(x), x, atol=2.4e-7)
    np.testing.assert_allclose(pk.preprocess(x, 64), x, atol=2.4e-7)
    small = np.asarray(PIL.Image.fromarray(uint8).resize((64, 64)))  # already model size
    unit = small.astype(np.float32) / 255  # a [0, 1] float image of the model's input shape
    # [0, 1] floats read as the same pixels as the uint8 image: x * 255 in float32 differs
    # from the integer by <= 255 * 2**-24, i.e. ~1.5e-5 / 127.5 on the [-1, 1] scale.
    expected = pk.preprocess(small, 64)
    np.testing.assert_allclose(model.preprocess(unit[None]), expected, atol=1e-6)
    np.testing.assert_allclose(pk.preprocess(unit, 64), expected, atol=1e-6)
    assert (pk.viz.to_uint8(unit) == small).all()
    assert (pk.viz.to_uint8(x[0]) == pk.images.to_uint8(x[0])).all()
    with pytest.raises(pk.ImageError, match="divide by 255"):
        model.preprocess(unit[None] * 255)
    # The prompt panel reads pictures with images.load_image: the same rule.
    assert pk.images.load_image(np.full((2, 2, 3), -0.5))[0, 0, 0] == 64  # (-0.5 + 1) * 127.5
    assert pk.images.load_image(np.full((2, 2, 3), 0.25))[0, 0, 0] == 64  # 0.25 * 255 = 63.75
    with pytest.raises(pk.ImageError):
        pk.images.load_image(np.full((2, 2, 3), 64.0))


def test_a_batch_array_is_judged_as_a_whole(model):
    x = model.preprocess([IMAGE, np.full((64, 64, 3), 255, np.uint8)])  # white: no negatives
    assert x[1].min() == 1.0
    np.testing.assert_allclose(model.preprocess(x), x, atol=2.4e-7)  # both read on [-1, 1]


def test_constrained_beam_search_returns_constrained_text(model):
    digits = [model.tokenizer.encode(str(d))[-1] for d in range(10)]
    allowed = [*digits, decode.EOS_ID]
    mask = _mask(model, allowed)
    prompt = "caption en"  # the demo model answers in words: digits only under the mask
    [free] = model.generate(IMAGE, prompt, max_new_tokens=6, sampler="beam(2)")
    assert not set(free.tokens.tolist()) <= set(allowed)
    outs = {}
    for sampler in ("beam(1)", "beam(2)", "greedy"):
        [outs[sampler]] = model.generate(IMAGE, prompt, max_new_tokens=6, sampler=sampler,
                                         logit_mask=mask)  # fmt: skip
        assert set(outs[sampler].tokens.tolist()) <= set(allowed), (sampler, outs[sampler].text)
        assert outs[sampler].text.strip().isdigit(), outs[sampler].text
    # beam(1) is greedy decoding, also under a mask
    assert outs["beam(1)"].tokens.tolist() == outs["greedy"].tokens.tolist()


def test_seed_does_not_change_deterministic_samplers(model):
    for sampler in ("greedy", "beam(2)"):
        a = model.generate(IMAGE, "caption en", max_new_tokens=4, sampler=sampler, seed=0)
        b = model.generate(IMAGE, "caption en", max_new_tokens=4, sampler=sampler, seed=7)
        assert a[0].tokens.tolist() == b[0].tokens.tolist()


def test_a_longer_text_len_allows_a_long_prompt(model):
    prompt = "caption en " * 12
    n = len(model.tokenizer.encode_prompt(prompt)["text"])
    with pytest.raises(pk.PromptTooLongError, match=f"text_len={n}"):
        model.generate(IMAGE, prompt, max_new_tokens=1)
    [out] = model.generate(IMAGE, prompt, max_new_tokens=1, text_len=n)
    assert len(out.tokens) == 1


def test_stream_checks_arguments_before_the_first_piece(model):
    with pytest.raises(pk.ArgumentError, match="max_new_tokens=0"):
        model.stream(IMAGE, "caption en", max_new_tokens=0)  # no next() needed
    assert "".join(model.stream([IMAGE], "caption en", max_new_tokens=4))


def test_parse_detections_treats_three_and_five_loc_tokens_alike():
    def loc(*bins):
        return "".join(f"<loc{b:04d}>" for b in bins)

    good = loc(1, 2, 3, 4) + " dog"
    assert parse_detections(loc(10, 20, 30) + " cat ; " + good, 64, 64)[0].label == "dog"
    assert len(parse_detections(loc(10, 20, 30, 40, 50) + " cat ; " + good, 64, 64)) == 1
    assert parse_detections(loc(10, 20, 30, 40, 50) + " cat", 64, 64) == []
    assert parse_detections(loc(10, 20, 30) + " cat", 64, 64) == []
    (det,) = parse_detections(loc(10, 20, 30, 40) + " cat", 64, 64)
    assert det.label == "cat"


def test_help_of_generate_lists_samplers_and_keywords():
    doc = pk.Model.generate.__doc__
    for name in decode._SAMPLER_ARGS:
        assert f'"{name}' in doc, name
    for keyword in ("max_new_tokens", "sampler", "seed", "text_len", "cache_dtype",
                    "logit_mask", "best_of"):  # fmt: skip
        assert f"{keyword}:" in doc, keyword


def test_export_hf_writes_over_an_earlier_export_and_with_force(tmp_path):
    folder = tmp_path / "hf"
    assert _cli("export-hf", "demo", str(folder))[0] == 0
    assert _cli("export-hf", "demo", str(folder))[0] == 0  # an earlier export: fine
    (folder / "notes.txt").write_text("mine")
    assert _cli("export-hf", "demo", str(folder))[0] == 2
    assert _cli("export-hf", "demo", str(folder), "--force")[0] == 0
    assert (folder / "notes.txt").read_text() == "mine"


def test_cli_debug_shows_the_traceback():
    with pytest.raises(pk.UnknownNameError):
        cli.main(["info", "nonexistent", "--debug"])


# --- property: any combination of arguments -> a valid result or one of the kit's errors ------

GOOD_MASK = "mask: 20 tokens + EOS"


def mostly(valid, invalid, weight: int = 9):
    """Valid values about weight / (weight + 1) of the time, so that whole calls often succeed."""
    good = st.sampled_from(valid)
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: good if ok else invalid)


# The valid values reuse a few compiled shapes (batch 1 or 2, one cache size and dtype, a few
# samplers), so that hundreds of examples run in well under a minute.
SAMPLERS = mostly(
    ["greedy", "nucleus(0.9)", "top_k(5)", "beam(2)", " top_k ( 5 ) "],
    st.one_of(
        st.sampled_from(["top_k(5000)", "beam(5000)", "temperature(0)", "temperature(-1)",
                         "nucleus(1.5)", "nucleus(0)", "gredy", "top_k(2.5)", "beam(0)",
                         "greedy(1)", "top_k()", "nucleus(nan)", "", "temperature(inf)", None, 3,
                         0.5, b"greedy", ["greedy"]]),
        st.text(max_size=10),
    ),
)  # fmt: skip
MAX_NEW = mostly([1, 2, 3, np.int64(2)], st.sampled_from([0, -5, 2.5, "2", None, True, 10**9]))
SEEDS = mostly([0, 1, 12345, -1, np.int32(3)],
               st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(["a", 1.5, None])))  # fmt: skip
BEST_OF = mostly([1, 1, 1, 2], st.sampled_from([0, -3, 1.5, "2", None]))
CACHE = mostly([None, "float32"], st.sampled_from(["int8", "bool", "uint8", "nope", 3, np.int8]))
MASKS = mostly([None, None, GOOD_MASK, "all", "ints"],
               st.sampled_from(["none", "short", "floats", "2d"]))  # fmt: skip
EXTRA = mostly([{}], st.sampled_from([{"foo": 1}, {"temperature": 0.5}, {"max_tokens": 3}]))
TEXT_LEN = mostly([None, 32], st.sampled_from([0, -1, "32", 2.0, 4]))
IMAGES = mostly(["path", "uint8", "unit", "model", "pil"],
                st.sampled_from(["0..255", "None", "missing", "bytes", "empty", "6d", "complex",
                                 "dict", "number", "two"]))  # fmt: skip
PROMPTS = mostly(["caption en", ("count",), ["detect circle"]],
                 st.sampled_from(["", [], None, [1], "x " * 40]))  # fmt: skip


def _image(kind, model):
    r = model.resolution
    return {
        "path": IMAGE, "uint8": np.zeros((20, 30, 3), np.uint8), "unit": np.full((r, r, 3), 0.5),
        "model": np.full((1, r, r, 3), -0.5, np.float32), "0..255": np.full((1, r, r, 3), 9.0),
        "None": None, "missing": "nothere.png", "bytes": b"junk", "two": [IMAGE, IMAGE],
        "empty": [], "6d": np.zeros((1, 1, 2, 2, 2, 3)), "complex": np.ones((8, 8, 3), complex),
        "dict": {"a": 1}, "pil": PIL.Image.new("RGB", (9, 7)), "number": 3.5,
    }[kind]  # fmt: skip


def _logit_mask(kind, model):
    v = model.config.llm.vocab_size
    return {
        None: None, GOOD_MASK: _mask(model, [*range(40, 60), decode.EOS_ID]),
        "all": np.ones(v, bool), "none": np.zeros(v, bool), "short": np.ones(5, bool),
        "floats": np.full(v, 0.5), "ints": np.ones(v, np.int64), "2d": np.ones((1, v), bool),
    }[kind]  # fmt: skip


def _valid(out, n_prompts, max_new):
    assert isinstance(out, list) and len(out) == n_prompts
    for g in out:
        assert isinstance(g, Generation) and isinstance(g.text, str)
        assert len(g.tokens) <= max_new and np.isfinite(g.logprobs).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)  # fmt: skip
@given(image=IMAGES, prompts=PROMPTS, sampler=SAMPLERS, max_new=MAX_NEW, seed=SEEDS,
       best_of=BEST_OF, cache=CACHE, mask=MASKS, extra=EXTRA, text_len=TEXT_LEN)  # fmt: skip
def test_generate_gives_a_result_or_the_kits_error(model, image, prompts, sampler, max_new, seed,
                                                   best_of, cache, mask, extra, text_len):  # fmt: skip
    kw = dict(max_new_tokens=max_new, sampler=sampler, seed=seed, best_of=best_of,
              cache_dtype=cache, logit_mask=_logit_mask(mask, model), text_len=text_len, **extra)  # fmt: skip
    try:
        out = model.generate(_image(image, model), prompts, **kw)
    except errors.PaliKitError as error:
        event(f"the kit's {type(error).__name__}: {str(error)[:50]}")
        return
    event("a result")
    n = max(len(prompts) if isinstance(prompts, (list, tuple)) else 1, 2 if image == "two" else 1)
    _valid(out, n, max_new)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)  # fmt: skip
@given(image=IMAGES, text=mostly(["ok", "list"], st.sampled_from(["ragged", "float", "3d", "big",
                                                                 "neg", "None", "empty"])),
       mask_input=mostly(["ok"], st.sampled_from(["short", "false", "floats", "None"])),
       sampler=SAMPLERS,
       max_new=MAX_NEW, seed=SEEDS, best_of=BEST_OF, cache=CACHE, mask=MASKS, extra=EXTRA)  # fmt: skip
def test_generate_tokens_gives_a_result_or_the_kits_error(model, image, text, mask_input, sampler,
                                                          max_new, seed, best_of, cache, mask,
                                                          extra):  # fmt: skip
    ids = np.asarray([[2, 40, 41, 108]], np.int32)
    texts = {"ok": ids, "ragged": [[2, 40], [2]], "float": ids.astype(float), "3d": ids[None],
             "big": ids + 5000, "neg": -ids, "None": None, "empty": ids[:, :0],
             "list": ids.tolist()}  # fmt: skip
    masks = {"ok": np.ones((1, 4), bool), "short": np.ones((1, 3), bool),
             "false": np.zeros((1, 4), bool), "floats": np.ones((1, 4)), "None": None}  # fmt: skip
    try:
        tokens, logp = model.generate_tokens(
            _image(image, model), texts[text], masks[mask_input], max_new_tokens=max_new,
            sampler=sampler, seed=seed, best_of=best_of, cache_dtype=cache,
            logit_mask=_logit_mask(mask, model), **extra,
        )  # fmt: skip
    except errors.PaliKitError as error:
        event(f"the kit's {type(error).__name__}: {str(error)[:50]}")
        return
    event("a result")
    assert tokens.shape == logp.shape == (1, max_new) and tokens.dtype == np.int32


if __name__ == "__main__":  # rewrite docs/errors.md from the catalogue
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = render_catalogue(pk.load("demo", verbose=False), Path(tmp))
    DOCS.write_text(text)
    print(f"wrote {DOCS} ({len(CASES)} cases)", file=sys.stderr)
