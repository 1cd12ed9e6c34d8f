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
# # 3. Fine-tuning: teach the model a new skill
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/pali-kit/pali_kit/blob/main/notebooks/03_finetuning.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/pali-kit/pali_kit/blob/main/notebooks/03_finetuning.ipynb)
#
# The demo model captions, counts and names colours, but it has never been asked
# *where* a shape is. This chapter teaches it: a jsonl dataset of a new question
# (`answer en where is the circle` -> `top left`), the model's held-out score
# before (it cannot answer), a choice of which weights to train and what each
# choice costs in memory, two short training runs with their loss curves, and the
# score after, with the answers on held-out images. The weights are the real
# ones, trained in place (no adapters), as in big_vision's fine-tuning colab.
#
# **Runtime:** a few minutes on a CPU with the demo model (the last cell prints
# the time and the machine); a free T4 GPU (16 GB) fine-tunes PaliGemma 2 3B with
# the reference recipe (set `MODEL` below).

# %% [markdown]
# ## Setup
#
# By default JAX reserves 75 % of a GPU's memory when it starts; fine-tuning a 3B
# model on a 16 GB T4 needs all of it. The first cell lets JAX take everything on
# a GPU, so it must run before JAX is imported (restart the runtime if you
# imported it already). On CPU and TPU it changes nothing.

# %% tags=["setup"]
import os
import shutil

if shutil.which("nvidia-smi"):
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "1.00"  # default .75: 3B would not fit a T4

# %% [markdown]
# The next cell installs the kit on Colab or Kaggle (a clone of the repository,
# which brings `data/`: the demo model, its tokenizer and the datasets). Running
# it again, or after a runtime restart, does nothing new. **Kaggle:** switch
# *Internet* on in the notebook's settings first (it needs a phone-verified
# account). If pip upgrades a package the runtime had already loaded (jax,
# ipywidgets), the cell stops and asks for a restart of the runtime: restart,
# then run it again.

# %% tags=["setup"]
# %matplotlib inline
import importlib.metadata
import importlib.util
import subprocess
import sys

if "COLAB_TPU_ADDR" in os.environ:  # Colab's legacy remote TPU, which JAX no longer supports
    raise RuntimeError("Colab's legacy TPU runtime is not supported: use a T4 GPU or a TPU v2 VM")
if importlib.util.find_spec("pali_kit") is None:  # Colab / Kaggle: install once
    loaded = {m: importlib.metadata.version(m) for m in ("jax", "ipywidgets") if m in sys.modules}
    if not os.path.isdir("pali_kit_repo"):  # the clone holds data/: demo model, datasets
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
from pali_kit import train as pt

START = time.perf_counter()
print(f"jax {jax.__version__} | {jax.default_backend()} ({jax.devices()[0].device_kind}) "
      f"| {jax.device_count()} device(s) | {pk.machine()} | pali_kit {pk.__version__}")

# %% [markdown]
# ## The model
#
# `MODEL = "demo"` trains the kit's tiny shapes model (its size is printed below)
# on a CPU. On a T4 set `"paligemma2-3b-pt-224"`: a *pretrained* (`pt`) checkpoint,
# the one made for fine-tuning (`mix` checkpoints are already fine-tuned on a
# mixture of tasks; Kaggle credentials: see chapter 1). The weights are not loaded
# here: each training run reads the checkpoint with `pt.Trainer.load`, which
# places every array straight in its training dtype (trainable weights float32,
# frozen ones `pk.device_dtype()`: float16 on a T4, bfloat16 on a TPU), one at a
# time, so a 3B model never exists twice in memory.

# %% tags=["setup"]
MODEL = "demo"  # or "paligemma2-3b-pt-224" on a GPU runtime

DEMO = MODEL == "demo"
if DEMO:
    CHECKPOINT = pk.asset_dir() / "demo_model.npz"
    tok, config = pk.Tokenizer.demo(), pk.load("demo", verbose=False).config
else:
    import urllib.request  # Kaggle's weights come without a tokenizer: big_vision's is public

    CHECKPOINT = pk.hub.download(MODEL)
    url = "https://storage.googleapis.com/big_vision/paligemma_tokenizer.model"
    tok = pk.Tokenizer(urllib.request.urlretrieve(url, "paligemma_tokenizer.model")[0])
    config = pk.CHECKPOINTS[MODEL].config
n_params = pk.model.count_params(pk.param_shapes(config))
print(f"{CHECKPOINT.name} | {n_params:,} parameters | {config.resolution} px | {tok.vocab_size} tokens")

# %% [markdown]
# ## The data
#
# One line per example in big_vision's jsonl format: an `image` path (relative to
# the file), the `prefix` (the prompt) and the `suffix` (the answer to learn); extra
# keys such as `task` are kept in `Example.meta`. The training file also rehearses
# two skills the model has (colour and count questions), so that it does not
# forget them while it learns the new one. The validation file holds other scenes,
# never trained on. `validate()` opens every image up front, so a broken file fails
# here with its line number, not in the middle of training.

# %% tags=["setup"]
folder = pk.asset_dir() / "where_dataset"  # written by scripts/make_where_dataset.py
train = pdata.JsonlDataset(folder / "train.jsonl").validate()
val = pdata.JsonlDataset(folder / "val.jsonl").validate()
print(train, val, sep="\n")
print({task: sum(ex.meta["task"] == task for ex in train) for task in ("where", "color", "count")})

# %% [markdown]
# What the model knows is measured on held-out data only, by one function used
# before and after training: the exact-match accuracy of the new question on
# `val.jsonl`, and of two old skills on 32 held-out synthetic scenes each
# (`pdata.score_shapes`, the scores `pali-kit demo` prints). All are fractions in
# [0, 1].

# %% tags=["setup"]
def skills(params, config) -> dict[str, float]:
    """Held-out accuracy of the new skill and of two old ones, each in [0, 1]."""
    new = pt.evaluate(params, config, val, tok, metric="exact_match", max_new_tokens=4,
                      batch_size=32)
    old = pdata.score_shapes(pk.Model(params, config, tok), 32, tasks=("color", "count"))
    return {"where (new)": new.score, "color (old)": old["color"], "count (old)": old["count"]}


evaluator = pt.Evaluator(val, tok, metric="exact_match", max_new_tokens=4, batch_size=32,
                         num_previews=8)

# %% [markdown]
# A picture of held-out answers: each image (enlarged), the question, what the
# model said and the target.

# %% tags=["setup"]
def preview_grid(result, cols: int = 4):
    """The previews of an EvalResult: image, question, answer (right or not) and target."""
    titles = [f"{p.prompt.removeprefix('answer en ')}?\nsaid: {p.prediction!r}"
              f"{' (right)' if p.prediction == p.reference else ''}\ntarget: {p.reference!r}"
              for p in result.previews]
    return pk.viz.show([p.image for p in result.previews], titles=titles, cols=cols, size=2.6)


# %% [markdown]
# ## Look at the data
#
# The first lines of the file, and a few training images with their question and
# answer. "Top left" means the centre of the shape lies in the top-left quarter of
# the image; the dataset asks only about shapes clearly inside one quarter.

# %%
print(*(folder / "train.jsonl").read_text().splitlines()[:3], sep="\n")
shown = [ex for ex in train if ex.meta["task"] == "where"][:8]
pk.viz.show([pk.images.load_image(ex.image) for ex in shown],
            titles=[f"{ex.prefix.removeprefix('answer en ')}?\n{ex.suffix}" for ex in shown],
            cols=4, size=2.4)

# %% [markdown]
# A `Batcher` turns examples into numpy batches: images resized to the model's
# resolution in [-1, 1], and `[BOS] prefix "\n" suffix [EOS]` token ids with the
# three masks (chapter 4 draws them). The loss is computed on the suffix only
# (`mask_loss`). Batch `k` depends only on the seed and `k`, so an interrupted run
# resumes with exactly the same batches.

# %%
batcher = pdata.Batcher(train, tok, batch_size=4, text_len=16, image_size=config.resolution)
batch = batcher.batch(0)
print({k: (v.shape, v.dtype.name) for k, v in batch.items()})
print(repr(tok.decode(batch["text"][0])), "| mask_loss:", batch["mask_loss"][0].tolist())

# %% [markdown]
# ## Which weights to train, and what they cost
#
# The kit trains a subset of the real weights and freezes the rest: frozen
# weights get no gradient and no optimizer state, and on an accelerator they stay
# in 16 bits. Two choices are compared below: `"attention"` (the attention
# projections of the language model, what the reference colab trains) and `"llm"`
# (the whole language model). `pt.trainable_mask` counts the parameters of each,
# for this model and for PaliGemma 2 3B (from its shapes: nothing is allocated).

# %%
shapes_3b = pk.param_shapes("paligemma2-3b-pt-224")  # jax.ShapeDtypeStruct leaves: no memory
demo_shapes = pk.param_shapes(config)
for subset in ["attention", "llm"]:
    print(f"{subset:9} {MODEL}: {pt.trainable_mask(demo_shapes, subset)[1]}")
    print(f"{subset:9} PaliGemma 2 3B: {pt.trainable_mask(shapes_3b, subset)[1]}")

# %% [markdown]
# `pt.plan` adds up the bytes of the weights, gradients and optimizer state from
# the shapes, and asks XLA how much scratch memory the compiled training step
# needs, without running it or allocating anything. Here PaliGemma 2 3B at 224 px
# with the reference colab's setting (frozen weights float16, SGD, batch 8, 128
# tokens), for both subsets: the verdict per device says which choice fits a T4.

# %%
for subset in ["attention", "llm"]:
    print(pt.plan("paligemma2-3b-pt-224", trainable=subset, batch_size=8, text_len=128,
                  frozen_dtype="float16", optimizer="sgd"), end="\n\n")

# %% [markdown]
# ## Teach the new skill
#
# ### The recipe
#
# For the demo model: AdamW, a short warm-up then a cosine decay,
# batch 16. For a real model on a T4, the reference colab's: SGD at learning rate
# 0.03, batch 8, 128 tokens. Each run starts from the checkpoint, reading it with
# `pt.Trainer.load`, and evaluates the new skill every `EVAL_EVERY` steps.

# %%
STEPS, EVAL_EVERY, BATCH, TEXT_LEN = (240, 60, 16, 16) if DEMO else (64, 16, 8, 128)
RECIPE = dict(optimizer="adamw", lr=3e-3) if DEMO else dict(optimizer="sgd", lr=0.03)


def finetune(subset: str) -> pt.Trainer:
    """A trainer for ``subset`` from the checkpoint, trained for STEPS steps."""
    trainer = pt.Trainer.load(CHECKPOINT, config, trainable=subset, num_steps=STEPS,
                              frozen_dtype=pk.device_dtype(), **RECIPE)
    batcher = pdata.Batcher(train, tok, batch_size=BATCH, text_len=TEXT_LEN,
                            image_size=config.resolution, seed=0)
    trainer.fit(batcher, evaluator=evaluator, eval_every=EVAL_EVERY, progress=False)
    return trainer


# %% [markdown]
# ### Before
#
# Before any training the model cannot answer the question: it has never produced
# the words "top", "bottom", "left" or "right" as an answer. The held-out scores of
# the checkpoint, and what it says:

# %%
trainer = pt.Trainer.load(CHECKPOINT, config, trainable="attention", num_steps=1,
                          frozen_dtype=pk.device_dtype())  # the checkpoint, untrained
before = skills(trainer.params, config)
print(before)
preview_grid(trainer.evaluate(evaluator))

# %% [markdown]
# ### Train
#
# Now train: once the whole language model (`"llm"`), once only its attention
# (`"attention"`), with the same recipe and the same batches. (With a 3B model on a
# T4 only `"attention"` fits, as the plans above say, so only that one runs.) The
# first steps include compiling the training step. The cell prints the time of
# each run (wall clock, and CPU time summed over all cores) and the machine.

# %%
SUBSETS = ["llm", "attention"] if DEMO else ["attention"]
runs, after_by_subset = {}, {}
del trainer  # free the untrained copy
for subset in SUBSETS:
    start, cpu = time.perf_counter(), time.process_time()
    runs[subset] = finetune(subset)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after_by_subset[subset] = skills(runs[subset].params, config)
    print(f"{subset:9}: {STEPS} steps in {seconds:.0f} s ({cpu:.0f} s of CPU time) on "
          f"{pk.machine()}, loss {runs[subset].history.loss[0]:.2f} -> "
          f"{runs[subset].history.loss[-1]:.3f}")

# %% [markdown]
# ### Before and after
#
# The same held-out measures before and after training (the first run), as a
# table and a plot: the new skill and the rehearsed old ones.

# %%
after = after_by_subset[SUBSETS[0]]
print(f"{'held-out accuracy':18} {'before':>7} {'after':>7}")
for key in before:
    print(f"{key:18} {before[key]:7.2f} {after[key]:7.2f}")

# %%
import matplotlib.pyplot as plt
import numpy as np

fig, ax = plt.subplots(figsize=(6, 2.8))
x = np.arange(len(before))
ax.bar(x - 0.2, list(before.values()), 0.4, label="before")
ax.bar(x + 0.2, list(after.values()), 0.4, label=f"after ({SUBSETS[0]})")
ax.set(xticks=x, xticklabels=list(before), ylim=(0, 1.05), ylabel="held-out accuracy")
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# The training loss at every step, and the held-out accuracy of the new skill at
# each evaluation, for each run:

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
for subset, trainer in runs.items():
    ax1.plot(trainer.history.step, trainer.history.loss, label=subset)
    evals = [(0, before["where (new)"])] + [(n, d["exact_match"]) for n, d in trainer.history.evals]
    steps, scores = zip(*evals)
    ax2.plot(steps, scores, marker="o", label=subset)
ax1.set(yscale="log", xlabel="step", ylabel="training loss")
ax2.set(ylim=(0, 1.05), xlabel="step", ylabel="held-out accuracy, new skill")
ax1.legend()
ax2.legend(loc="lower right")
plt.show()

# %% [markdown]
# What the trained model says on held-out images:

# %%
preview_grid(runs[SUBSETS[0]].evaluate(evaluator))

# %% [markdown]
# ### attention or llm?
#
# Both choices train the real weights, no adapters: the memory plans above and the
# scores here are the price and the gain. Training only the attention moves fewer
# weights, so in the same number of steps it learns less; on a T4 it is what fits
# a 3B model.

# %%
print(f"{'trainable':10} {'parameters':>11} " + " ".join(f"{k:>12}" for k in before))
for subset, scores in after_by_subset.items():
    n = runs[subset].summary.split(" of ")[0]  # "1,017,472 of 1,463,680 parameters ..."
    print(f"{subset:10} {n:>11} " + " ".join(f"{v:12.2f}" for v in scores.values()))

# %% [markdown]
# ### Save and load back
#
# `trainer.save` writes one `.npz` atomically (a temporary file, then a rename, so
# an interrupted save never leaves half a checkpoint): the weights under
# `params/...` in the official layout, plus the optimizer state and the step, so
# `pt.Trainer.load(path)` resumes the run. `pk.load` reads it like any official
# checkpoint, and the reloaded model answers as the trainer did.

# %%
import tempfile
from pathlib import Path

checkpoint = Path(tempfile.gettempdir()) / "pali_kit_finetune" / f"{MODEL}-where.npz"
checkpoint.parent.mkdir(parents=True, exist_ok=True)
runs[SUBSETS[0]].save(checkpoint)
tuned = pk.load(checkpoint, tokenizer=tok, dtype=pk.device_dtype())
again = pt.evaluate(tuned.params, tuned.config, val, tok, metric="exact_match", max_new_tokens=4,
                    batch_size=32).score
print(f"{checkpoint.name}: {checkpoint.stat().st_size / 2**20:.1f} MiB; the reloaded model's "
      f"held-out accuracy on the new skill: {again:.2f} (the trainer's: {after['where (new)']:.2f})")

# %% [markdown]
# ## On a free T4 with PaliGemma 2 3B, on a TPU host
#
# Set `MODEL = "paligemma2-3b-pt-224"`, choose a T4 runtime and run the notebook
# again: the same cells then load the checkpoint leaf by leaf, train with the
# reference recipe and print the memory plan it follows. For your own data, point
# `JsonlDataset` at your file and pick a metric: `pt.Evaluator(val, tok,
# metric="cider")` for captions (also `"bleu"`, `"vqa"`, `"anls"`,
# `"exact_match"`, `"detection"`, or a function). To resume an interrupted run,
# `pt.Trainer.load(checkpoint, trainable=..., num_steps=...)` and `fit` again with
# the same `Batcher`.
#
# On a TPU host (or several GPUs) nothing changes in the code: the trainer puts
# all local devices in a 1-D mesh (`pt.make_mesh()`), splits each batch across
# them (data parallel) and splits every large weight and optimizer-state array
# along one dimension (FSDP); `pt.plan(...).per_core()` gives the memory per core.
# Use a batch size divisible by the number of devices.

# %%
print(f"this notebook ran in {time.perf_counter() - START:.0f} s on {pk.machine()}")

# %% [markdown]
# ## Next
#
# [4. Under the hood](04_under_the_hood.ipynb): the parameters, the masks that the
# training step uses, the KV cache, and where the model looks in the image.
