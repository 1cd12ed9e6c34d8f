# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Inference quick start
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/pali-kit/pali_kit/blob/main/notebooks/01_inference.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/pali-kit/pali_kit/blob/main/notebooks/01_inference.ipynb)
#
# Load a PaliGemma, look at how a prompt becomes tokens, and ask it for captions,
# answers to questions and text; then batch several images and prompts, try every
# sampler, stream an answer, read the log-probability of any answer, open the
# interactive prompt panel, compare the weights' memory and speed per dtype
# (float32 to int4), and see why trying a new prompt does not compile anything.
#
# **Runtime:** about a minute on a CPU with the demo model (the last cell prints
# the time and the machine); a free T4 GPU runs the real PaliGemma 2 3B (set
# `MODEL` below).

# %% [markdown]
# ## Setup
#
# Run the setup cells first (each section below runs after them alone, so any
# section can be copied elsewhere). On Colab or Kaggle the first one clones the
# kit (the clone brings `data/`: sample images, the demo model and its tokenizer)
# and installs it; inside a checkout of the repository `pali_kit` is already
# installed and it does nothing. Running it again, or after a runtime restart,
# does nothing new. **Kaggle:** switch *Internet* on in the notebook's settings
# first (it needs a phone-verified account). If pip upgrades a package the runtime
# had already loaded (jax, ipywidgets), the cell stops and asks for a restart of
# the runtime: restart, then run it again.

# %% tags=["setup"]
# %matplotlib inline
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

if "COLAB_TPU_ADDR" in os.environ:  # Colab's legacy remote TPU, which JAX no longer supports
    raise RuntimeError("Colab's legacy TPU runtime is not supported: use a T4 GPU or a TPU v2 VM")
if importlib.util.find_spec("pali_kit") is None:  # Colab / Kaggle: install once
    loaded = {m: importlib.metadata.version(m) for m in ("jax", "ipywidgets") if m in sys.modules}
    if not os.path.isdir("pali_kit_repo"):  # the clone holds data/: images, demo model, tokenizer
        url = "https://github.com/pali-kit/pali_kit"
        if subprocess.run(["git", "clone", "-q", "--depth=1", url, "pali_kit_repo"]).returncode:
            raise RuntimeError("git clone failed: on Kaggle, switch Internet on in the settings")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "pali_kit_repo"], check=True)
    sys.path.insert(0, os.path.abspath("pali_kit_repo"))  # now; after a restart via the install
    upgraded = [m for m, v in loaded.items() if importlib.metadata.version(m) != v]
    if upgraded:
        raise RuntimeError(f"pip upgraded {upgraded}, already loaded: restart the runtime, rerun")

# %% tags=["setup"]
import time

import jax

import pali_kit as pk
from pali_kit import data as pdata
from pali_kit import tokenizer as ptok

START = time.perf_counter()
print(f"jax {jax.__version__} | {jax.default_backend()} ({jax.devices()[0].device_kind}) "
      f"| {jax.device_count()} device(s) | {pk.machine()} | pali_kit {pk.__version__}")

# %% [markdown]
# ## The model
#
# `MODEL = "demo"` is the tiny PaliGemma 2 that ships with the kit (its summary
# below gives its size: 64 px input, about 1.5 M parameters). It was trained only on
# synthetic pictures of circles, squares and triangles in four colours, so it
# captions, counts, names colours, detects and segments those shapes, and nothing
# else. (Should `data/demo_model.npz` be missing, `pk.load("demo")` warns and uses
# a random model of the same size: every cell still runs, the answers are noise.)
#
# To use a real checkpoint, change that one line on a GPU runtime (a free T4
# is enough for the 3B models), e.g. `MODEL = "paligemma2-3b-mix-224"`; any
# name in `pk.CHECKPOINTS` works. `pk.device_dtype()` picks the weights' dtype for
# the accelerator: float16 on a T4 (it has no bfloat16 units), bfloat16 on a TPU or
# a recent GPU, float32 on a CPU. The weights come from Kaggle:
#
# 1. Accept the licence on the model page with your Kaggle account:
#    [PaliGemma 2](https://www.kaggle.com/models/google/paligemma-2),
#    [PaliGemma](https://www.kaggle.com/models/google/paligemma).
# 2. **Colab:** in the 🔑 Secrets pane add `KAGGLE_USERNAME` and `KAGGLE_KEY`
#    (from kaggle.com → Settings → *Create New Token*) and allow this notebook
#    to read them. **Kaggle:** attach the model (*Add Input → Models*) or just
#    run; your Kaggle session is used. **Elsewhere:** the environment variables
#    of the same names, or `~/.kaggle/kaggle.json`.
#
# The kit reads the key where it is and never prints it. The first load
# downloads the weights (several GB for a 3B model) into kagglehub's cache.
#
# The sample images come with their ground truth (`data/images/ground_truth.json`),
# so every answer below can be checked.

# %% tags=["setup"]
MODEL = "demo"  # or "paligemma2-3b-mix-224" on a GPU runtime

model = pk.load(MODEL, dtype=pk.device_dtype())  # float16 on a T4; prints model.summary()
if model.tokenizer is None:  # Kaggle's weights come without it: fetch big_vision's (public)
    import urllib.request

    url = "https://storage.googleapis.com/big_vision/paligemma_tokenizer.model"
    model.tokenizer = pk.Tokenizer(urllib.request.urlretrieve(url, "paligemma_tokenizer.model")[0])
tok = model.tokenizer
TRUTH = pdata.sample_ground_truth()  # file name -> caption, count, objects (label, colour, box)
IMAGES = [pk.asset_dir() / "images" / name for name in TRUTH]
image = IMAGES[0]
print([p.name for p in IMAGES])

# %% [markdown]
# ## The sample images
#
# The first three are scenes from the demo model's own world (one is a JPEG stored
# on its side with an EXIF rotation, which the loader turns upright). The last is
# deliberately out of it: a grayscale, photo-like picture with shading, shadows
# and noise, the kind of image a 1.5 M-parameter model trained on flat synthetic
# shapes has never seen.

# %%
pictures = [pk.images.load_image(p) for p in IMAGES]  # uint8 [H, W, 3], upright
titles = [f"{p.name} {a.shape[1]}x{a.shape[0]}\n"
          f"{'in its world' if TRUTH[p.name]['in_domain'] else 'OUT of its world'}"
          for p, a in zip(IMAGES, pictures)]
pk.viz.show(pictures, titles=titles)

# %% [markdown]
# ## Prompts are short strings
#
# PaliGemma was trained on a fixed set of task prefixes. The builders in
# `pali_kit.tokenizer` spell them exactly (and check language codes and object
# lists), so a typo does not silently become a prompt the model never saw.

# %%
prompts = [
    ptok.caption("en"),  # a short caption
    ptok.answer("how many shapes"),  # visual question answering
    ptok.answer("what color is the circle"),
    ptok.ocr(),  # read the text in the image
    ptok.detect("circle"),  # boxes, chapter 2
]
for p in prompts:
    print(repr(p))

# %% [markdown]
# ## What the model reads
#
# A prompt becomes `[BOS] + tokens(prompt) + tokens("\n")`: the prompt and the
# newline separator are tokenized separately, as in big_vision. The image's tokens
# go in front of these, and together they form the *prefix*, which the model reads
# with full (bidirectional) attention. The answer comes after the `"\n"`, one token
# at a time, and ends with EOS.

# %%
enc = tok.encode_prompt(ptok.answer("what color is the circle"))
print("ids:   ", enc["text"].tolist())
print("pieces:", tok.pieces(enc["text"]))
print(f"BOS={tok.bos_id} EOS={tok.eos_id} PAD={tok.pad_id} newline={tok.newline_ids} "
      f"vocabulary={tok.vocab_size}")

# %% [markdown]
# ## Caption, VQA, OCR
#
# `model.generate(image, prompts)` answers one or several prompts; one image with
# several prompts is broadcast. It returns one `Generation` per prompt, with the
# `text` (decoded up to EOS), the `tokens` and their `logprobs`. Answers are
# printed with `repr` so that spaces and newlines show, and checked against the
# image's ground truth with `pdata.grade_answer` (`?` where the truth cannot say:
# the demo model never learned to read, and the images hold no text; `ocr` is
# there for the real checkpoints).

# %%
prompts = [ptok.caption("en"), ptok.answer("how many shapes"),
           ptok.answer("what color is the circle"), ptok.ocr()]
marks = {True: "right", False: "WRONG", None: "?"}
for out in model.generate(image, prompts, max_new_tokens=24):
    verdict = marks[pdata.grade_answer(out.prompt, out.text, TRUTH[image.name])]
    print(f"{out.prompt:35} -> {out.text!r:55} {verdict}")

# %% [markdown]
# ## Batches
#
# Several images with one prompt, or equal-length lists of images and prompts that
# pair up: the kit pads the batch and the prompts and decodes all rows together.
# A padded row decodes exactly as it would alone. The out-of-domain picture shows
# what the model does outside its world.

# %%
outs = model.generate(IMAGES, ptok.caption("en"), max_new_tokens=24)  # every image, one prompt
for path, out in zip(IMAGES, outs):
    truth = TRUTH[path.name]["caption"] or "(none: out of its world)"
    print(f"{path.name:18} {out.text!r:52} truth: {truth!r}")
pk.viz.image_grid([pk.viz.draw_caption(pk.images.load_image(p), o.text)
                   for p, o in zip(IMAGES, outs)])

# %%
images = [IMAGES[1], IMAGES[2], IMAGES[3]]
questions = [ptok.answer("how many shapes"), ptok.answer("what color is the square"),
             ptok.answer("what color is the square")]
for im, out in zip(images, model.generate(images, questions, max_new_tokens=24)):
    right = pdata.grade_answer(out.prompt, out.text, TRUTH[im.name])
    print(f"{im.name:18} {out.prompt:35} -> {out.text!r:8} {'right' if right else 'WRONG'}")

# %% [markdown]
# ## Sampling
#
# Samplers are spec strings, as in big_vision: `"greedy"` (the default,
# deterministic), `"temperature(t)"`, `"nucleus(p)"` / `"nucleus(p, t)"`,
# `"top_k(k)"` / `"top_k(k, t)"` and `"beam(n)"`. Random samplers draw from `seed`:
# the same seed gives the same answer, another seed another draw. `score` is the
# answer's total log-probability.

# %%
for sampler in ["greedy", "temperature(1.0)", "nucleus(0.9)", "top_k(5)", "beam(3)"]:
    for seed in (0, 1):
        [out] = model.generate(image, ptok.caption("en"), sampler=sampler, seed=seed,
                               max_new_tokens=24)
        print(f"{sampler:17} seed {seed}: {out.text!r:55.55} log-prob {out.score:7.2f}")

# %% [markdown]
# `best_of=n` samples every prompt `n` times and keeps the most likely answer
# (the highest summed log-probability), as big_vision's best-of-n decoding does.

# %%
for n in (1, 4):
    [out] = model.generate(image, ptok.caption("en"), sampler="temperature(0.8)", best_of=n,
                           seed=0, max_new_tokens=24)
    print(f"best_of={n}: {out.text!r:55.55} log-prob {out.score:7.2f}")

# %% [markdown]
# ## Streaming
#
# `model.stream` yields the answer's text piece by piece as tokens come out of the
# decoder (one image, one prompt), which is what the prompt panel shows.

# %%
for piece in model.stream(IMAGES[1], ptok.caption("en"), max_new_tokens=24):
    print(piece, end="|", flush=True)  # "|" marks where one piece ends

# %% [markdown]
# ## Log-probabilities
#
# Each generated token comes with its log-probability under the model. A token
# id is shown with its SentencePiece piece (`▁` is a space).

# %%
import numpy as np

[out] = model.generate(image, ptok.answer("what color is the circle"), max_new_tokens=12)
for t, lp in zip(out.tokens, out.logprobs):
    print(f"{int(t):7d} {tok.id_to_piece(int(t))!r:14} log-prob {lp:7.3f}  p = {np.exp(lp):.3f}")
print(f"answer {out.text!r}: total log-prob {out.score:.3f}")

# %% [markdown]
# The model can also *score* an answer it did not generate: feed
# `[BOS] prompt "\n" answer [EOS]` through one forward pass (`model.logits`) and
# add up the log-probabilities of the answer's tokens, each predicted from the
# tokens before it. This is the training loss of chapter 3, for one example; it
# ranks candidate answers without generating anything.

# %%
def answer_logprob(model, image, prompt, answer, text_len=48):
    ex = model.tokenizer.encode_example(prompt, answer, text_len=text_len)  # 1-D arrays
    text, mask_ar, mask_input = (ex[k][None, :-1] for k in ("text", "mask_ar", "mask_input"))
    logp = jax.nn.log_softmax(model.logits(image, text, mask_ar, mask_input), axis=-1)
    targets, weights = ex["text"][1:], ex["mask_loss"][1:]  # next tokens; 1 on answer + EOS
    token_logp = np.take_along_axis(np.asarray(logp[0]), targets[:, None], axis=-1)[:, 0]
    return float(np.sum(token_logp * weights))


candidates = [TRUTH[image.name]["caption"], "a red circle", "a blue square", "a cat on a sofa"]
for candidate in candidates:
    print(f"{candidate!r:52} {answer_logprob(model, image, ptok.caption('en'), candidate):8.2f}")

# %% [markdown]
# ## The prompt panel
#
# An interactive panel: pick or upload an image, choose a task, type a question or
# object names, pick a sampler and press *Run*. It shows the exact prompt string,
# streams the answer, draws boxes and masks, and prints the call that reproduces
# the run: `model.generate(...)` for captions and questions; for detect and segment
# the `model.detect(...)` / `model.segment(...)` call of chapter 2, whose objects
# it scores (each tag reads "label score", with a table of label, score and box).
# Its *constrained* box (on by default) keeps detect and segment answers parseable,
# naming only the objects typed. Its *weights* selector makes other weights from
# the loaded model (next section) and shows their size; the code line then starts
# with `model.astype(...)` or `model.quantize(...)`.

# %%
panel = pk.widgets.prompt_panel(model)

# %% [markdown]
# The panel is plain Python underneath: set its widgets and call `run()`, which is
# what the *Run* button does.

# %%
panel.task.value, panel.text.value = "detect", "circle"
result = panel.run()
print(result.prompt, "->", repr(result.text))
for d in result.detections:  # the objects model.detect returns: label, box, score
    print(f"{d.label}: box {tuple(round(v) for v in d.box)}, score {d.score:.2f}")
print(panel.code_line())

# %% [markdown]
# ## Memory and speed per dtype
#
# The same model in other weights, made in memory from the loaded one:
# `model.astype(dtype)` casts every weight; `model.quantize("int8")` stores each
# large matrix as 8-bit integers with one float scale per output channel,
# `"int4"` as 4-bit integers with a scale per group of 64 (`docs/quantization.md`).
# `pk.load(MODEL, quantize="int8")` does the same while reading the file, and
# `pali-kit generate IMAGE PROMPT --quantize int8` on the command line. The rows
# are the weights this device runs (`pk.widgets.weight_choices()`, the panel's
# list), none wider than the loaded ones; each gives its size, its time per
# generated token (the median interval between the tokens of a streamed caption,
# three times) and its answers, all against the first row, measured in this one
# cell.

# %%
import numpy as np

from pali_kit import quant


def weight_bytes(m):  # a quantized model: its integers and their scales
    return quant.tree_nbytes(m.params) if m.quantization else m.num_params() * m.dtype.itemsize


def streamed(m, prompt):
    """(the answer, the seconds between its streamed tokens)"""
    ticks, pieces = [], []
    for piece in m.stream(image, prompt, max_new_tokens=24):
        ticks.append(time.perf_counter())
        pieces.append(piece)
    return "".join(pieces), np.diff(ticks)


# %%
as_loaded = model.quantization or model.dtype.name
weights = [w for w in pk.widgets.weight_choices() if w in quant.SCHEMES
           or pk.checkpoints.as_dtype(w).itemsize <= model.dtype.itemsize]  # fmt: skip
questions = [ptok.caption("en"), ptok.answer("how many shapes")]
rows = []
for w in [as_loaded] + [w for w in weights if w != as_loaded]:
    m = model if w == as_loaded else model.quantize(w) if w in quant.SCHEMES else model.astype(w)
    answers = [streamed(m, q)[0] for q in questions]  # the first one compiles
    gaps = np.concatenate([streamed(m, questions[0])[1] for _ in range(3)])
    rows.append((w, weight_bytes(m), float(np.median(gaps)), answers))
    del m  # one copy at a time beside the loaded model
first = rows[0]
print(f"{pk.machine()}; ratios against the first row")
for w, size, s, answers in rows:
    same = "same answers" if answers == first[3] else "other answers"
    print(f"{w:9} {size / 1e6:8.2f} MB {size / first[1]:5.2f}x  {s * 1e3:7.2f} ms/token "
          f"{s / first[2]:5.2f}x  {answers} ({same})")

# %% [markdown]
# The demo model's weights are a few megabytes, small enough to stay in the
# processor's caches, so its time per token says little about a large model's,
# whose weights are read from memory at every token; the size column carries
# over, and the time column varies from run to run (and with other work on the
# machine). For the full-size PaliGemma 2 3B on a CPU, `bench/generate.py` measured
# (random weights, `--dtypes bfloat16,int8,int4`, one run on a 2-core VM with
# AVX-512 and avx512_bf16, busy with other jobs), as `docs/quantization.md`
# reports: decode 0.307 s/token in bfloat16, 0.149 in int8 and 0.151 in int4;
# prefill to the first token 12.35 / 12.96 / 9.93 s; peak memory (RSS) 6.9 /
# 4.0 / 2.7 GB. The 3B weights take 6.06 GB in bfloat16, 3.04 GB in int8 and
# 1.71 GB in int4 (`bench/quantize.py --3b`). On that CPU int8 and int4 both
# decode in about half the bfloat16 time; int4 holds the fewest bytes, but
# unpacking them costs arithmetic (see "Open" in `docs/quantization.md`).

# %% [markdown]
# ## Compiled once
#
# The first call compiles the model for a batch size, a prompt length and an answer
# budget. Shapes are *bucketed* (batch to a power of two, prompts to a power of two
# of at least 32 tokens, the cache to multiples of 128 slots), so new prompts of a
# similar size reuse the compiled code: only a new bucket compiles again.
# `pali_kit.decode.compile_count()` counts the compilations; the times are of this
# machine.

# %%
from pali_kit import decode

print(pk.machine())
for question in ["what color is the square", "how many triangles are there", "is there a circle"]:
    count, start = decode.compile_count(), time.perf_counter()
    [out] = model.generate(image, ptok.answer(question), max_new_tokens=24)
    print(f"{question!r:32} {time.perf_counter() - start:5.2f} s, "
          f"new compilations: {decode.compile_count() - count}")
for n in (6, 7):  # batches of 6 and 7 prompts share the bucket of 8: only the first compiles
    count = decode.compile_count()
    model.generate(image, [ptok.answer("how many shapes")] * n, max_new_tokens=24)
    print(f"a batch of {n}: new compilations: {decode.compile_count() - count}")

# %%
print(f"this notebook ran in {time.perf_counter() - START:.0f} s on {pk.machine()}")

# %% [markdown]
# ## Next
#
# [2. Detection and segmentation](02_detection_segmentation.ipynb): what the
# `<loc>` and `<seg>` tokens in a `detect` answer mean, and how to draw them.
