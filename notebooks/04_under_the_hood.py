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
# # 4. Under the hood
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/pali-kit/pali_kit/blob/main/notebooks/04_under_the_hood.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/pali-kit/pali_kit/blob/main/notebooks/04_under_the_hood.ipynb)
#
# Open the model up: the configuration and every parameter of PaliGemma 2 3B
# (counted from shapes, nothing allocated), the image encoder's output, the three
# masks of a training example and the prefix-LM attention pattern they make, the
# special tokens and positions, a KV cache filled and extended by hand, and the
# attention of the answer's tokens over the image, recomputed from the weights in
# a few lines of `jnp`.
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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import pali_kit as pk
from pali_kit import data as pdata
from pali_kit import tokenizer as ptok

START = time.perf_counter()
print(f"jax {jax.__version__} | {jax.default_backend()} ({jax.devices()[0].device_kind}) "
      f"| {jax.device_count()} device(s) | {pk.machine()} | pali_kit {pk.__version__}")

# %% [markdown]
# ## The model
#
# The cells below work with the demo model and with a real checkpoint (set `MODEL`
# on a GPU runtime; Kaggle credentials: see chapter 1; `pk.device_dtype()` picks
# float16 on a T4, bfloat16 on a TPU). The setup also prepares what several
# sections look at: one image as the model's input (`pixels`), the number of image
# tokens `N`, and the configuration of PaliGemma 2 3B (`cfg_3b`).

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
pixels = model.preprocess(image)  # float32 [1, R, R, 3] in [-1, 1]
N = model.config.vision.num_tokens  # image tokens: (R / patch size) ** 2
cfg_3b = pk.CHECKPOINTS["paligemma2-3b-pt-224"].config

# %% [markdown]
# ## Configuration and parameters
#
# A PaliGemma is a SigLIP image encoder whose output is projected to the width of a
# Gemma language model. The configs carry big_vision's field names. Every official
# checkpoint is in the registry `pk.CHECKPOINTS`.

# %%
import math
from collections import Counter

from pali_kit import checkpoints

print(cfg_3b.vision)
print(cfg_3b.llm)
print(len(pk.CHECKPOINTS), "checkpoints, e.g.", sorted(pk.CHECKPOINTS)[:3])

# %% [markdown]
# The registry shows the kinds of checkpoints and their resolutions. `pt`
# checkpoints are pretrained, in stages at 224, then 448, then 896 px (more pixels
# give more image tokens and come with a longer text): the ones to fine-tune, as
# chapter 3 does. `mix` checkpoints were then fine-tuned on a mixture of tasks and
# answer prompts as they are; `ft` ones were transferred to one task each.

# %%
from collections import defaultdict

kinds = defaultdict(list)  # ("paligemma2-3b", "pt") -> its checkpoints
for info in pk.CHECKPOINTS.values():
    family, size, kind = info.name.split("-")[:3]
    kinds[(f"{family}-{size}", kind)].append(info)
for (family, kind), infos in sorted(kinds.items()):
    sizes = sorted({(i.resolution, i.config.vision.num_tokens, i.text_len) for i in infos})
    shown = ", ".join(f"{r} px ({n} image tokens, text {t})" for r, n, t in sizes)
    print(f"{family:16} {kind:3} {len(infos):3} checkpoint(s): {shown}")

# %% [markdown]
# `pk.param_shapes` gives the parameter tree of any config as shapes only
# (`jax.eval_shape`): the 3B model's full table, with no memory used. Layers are
# *stacked*: each per-layer weight has a leading axis of size `depth`, exactly as
# in the official `.npz`.

# %%
shapes = checkpoints.flatten(pk.param_shapes(cfg_3b))  # {"llm/layers/...": ShapeDtypeStruct}
parts = Counter()
for key, s in shapes.items():
    parts["/".join(key.split("/")[:2])] += math.prod(s.shape)
for part, n in parts.items():
    print(f"{part:22} {n:>15,}")
print(f"{'total':22} {sum(parts.values()):>15,}")

# %%
print(f"{'parameter':76} {'shape':>20} {'count':>13}")
for key, s in shapes.items():
    print(f"{key:76} {str(s.shape):>20} {math.prod(s.shape):>13,}")

# %% [markdown]
# ## The image encoder
#
# The image is cut into `patch_size` x `patch_size` patches, one token each
# (224 / 14 = 16, so 256 tokens for the 224 px models; 64 / 8 = 8, so 64 for the demo),
# and SigLIP's output is projected to the LLM's width. These vectors go in front of
# the text embeddings. `jax.eval_shape` gives the 3B model's shapes without running it.

# %%
print("this model:", pixels.shape, "->", model.embed_image(pixels).shape, "(batch, tokens, width)")
embed = lambda p, x: pk.PaliGemma(cfg_3b).apply({"params": p}, x, method="embed_image")
x_3b = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
z_3b = jax.eval_shape(embed, pk.param_shapes(cfg_3b), x_3b)  # shapes in, shapes out
print("PaliGemma 2 3B:", x_3b.shape, "->", z_3b.shape)

# %% [markdown]
# ## The three masks
#
# A training example is `[BOS] prefix "\n" suffix [EOS]`, padded to a fixed length,
# with three masks:
#
# * `mask_ar`: 0 on the prefix (full attention), 1 on the suffix (each token starts
#   a new causal step);
# * `mask_loss`: 1 where the loss is computed, the suffix and EOS;
# * `mask_input`: 1 on real tokens, 0 on padding.

# %%
ex = tok.encode_example(ptok.caption("en"), "a red circle", text_len=15)  # 16 columns
fig, ax = plt.subplots(figsize=(10, 2.2))
masks = np.stack([ex["mask_ar"], ex["mask_loss"], ex["mask_input"]])  # [3, T]
ax.imshow(masks, cmap="Blues", vmin=0, vmax=1.4)
ax.set_yticks(range(3), ["mask_ar", "mask_loss", "mask_input"])
ax.set_xticks(range(len(ex["text"])), tok.pieces(ex["text"]), rotation=60)
plt.show()

# %% [markdown]
# The attention mask follows from `mask_ar` by big_vision's cumsum rule: token `i`
# may attend to token `j` iff `cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]` (and both
# are real tokens). The image tokens come first with `mask_ar = 0`, so image, BOS,
# prompt and `"\n"` form one bidirectional block; the answer is causal. Rows are
# queries, columns keys.

# %%
from pali_kit.model import make_attn_mask

input_mask = np.concatenate([np.ones(N, bool), ex["mask_input"]])[None]  # image tokens first
full_ar = np.concatenate([np.zeros(N, np.int32), ex["mask_ar"]])[None]
attn = make_attn_mask(input_mask, full_ar)[0]  # bool [N + T, N + T]: (query, key)
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(attn, cmap="Greys", interpolation="nearest")
n_prefix = N + int((ex["mask_ar"] == 0).sum())
for edge in (N - 0.5, n_prefix - 0.5):
    ax.axhline(edge, color="tab:red", lw=0.8)
    ax.axvline(edge, color="tab:red", lw=0.8)
ax.set(title=f"image | prefix | suffix + padding ({N} image tokens)", xlabel="key", ylabel="query")
plt.show()

# %% [markdown]
# ## Tokens and positions
#
# `<loc>` and `<seg>` are the last 1024 + 128 vocabulary entries. Positions (for the
# rotary embedding) count real tokens only, so padding does not shift them: here
# two prompts of different lengths in one right-padded batch.

# %%
from pali_kit.model import positions_from_mask

print(f"vocabulary {tok.vocab_size}: <loc> ids {tok.loc_ids.start}..{tok.loc_ids.stop - 1}, "
      f"<seg> ids {tok.seg_ids.start}..{tok.seg_ids.stop - 1}")
answer = "<loc0102><loc0250><loc0870><loc0990> circle"
print(answer, "->", tok.encode(answer))
two = [ptok.caption("en"), ptok.answer("what color is the circle")]
batch = tok.encode_prompts(two, bucket=None)  # right-padded to the longer prompt
mask = np.concatenate([np.ones((2, N), bool), batch["mask_input"]], axis=1)
print("mask_input:\n", batch["mask_input"].astype(int))
print("their positions (the image has 0..N-1):\n", positions_from_mask(mask)[:, N:])

# %% [markdown]
# ## The KV cache
#
# Generation runs the prefix (image + prompt) once, keeping every layer's keys and
# values in a cache (`prefill`), then feeds one token at a time (`decode_step`),
# writing its keys and values into the next free slot. These are methods of the
# Flax module, used here directly, with greedy choice of each token.

# %%
module = pk.PaliGemma(model.config)
enc = tok.encode_prompts([ptok.caption("en")], bucket=None)  # int32 [1, T], all prefix
T, NEW = enc["text"].shape[1], 12
CACHE = N + T + NEW  # slots: image, prompt, new tokens
prefill = jax.jit(lambda p, x, t, m: module.apply({"params": p}, x, t, m, CACHE, method="prefill"))
step = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method="decode_step"))
logits, cache, valid, pos = prefill(model.params, pixels, enc["text"], enc["mask_input"])
print(f"{len(cache.k)} layers of keys and values, each {cache.k[0].shape}: "
      "(batch, slots, kv heads, H)")
print(f"slots filled: {int(valid.sum())} of {CACHE}; the next token's position: {pos}")

# %%
tokens = []
for i in range(NEW):
    next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy: int32 [1]
    tokens.append(int(next_token[0]))
    if tokens[-1] == tok.eos_id:
        break
    slot = jnp.int32(N + T + i)  # the next free cache slot
    logits, cache, valid = step(model.params, next_token, cache, valid, pos + i, slot)
print("cached decoding:", tokens, repr(tok.decode(tokens)))
[out] = model.generate(image, ptok.caption("en"), max_new_tokens=NEW)
print("model.generate: ", out.tokens.tolist())

# %% [markdown]
# The cache is only a speed-up: one full forward pass over the prompt followed by
# the generated tokens (`mask_ar` 1 on them: causal) predicts the same tokens,
# position by position.

# %%
text = np.concatenate([enc["text"][0], tokens[:-1]])[None]  # prompt + all but the last new token
mask_ar = np.array([0] * T + [1] * (len(tokens) - 1))[None]
full = model.logits(pixels, text, mask_ar)  # float32 [1, T + n - 1, V]
again = np.asarray(full[0, T - 1 :].argmax(-1)).tolist()
print("full forward:   ", again)
print("same tokens as the cached decoding:", again == tokens)

# %% [markdown]
# ## Where the answer looks in the image
#
# Attention weights are not an output of the model, but they are a few lines of
# `jnp` away. Run the model's own layers (`Block`) on the sequence image + prompt +
# answer up to layer `LAYER`, then recompute that layer's attention scores from its
# weights: normalise, project to queries and keys, rotate them (RoPE), scale,
# softcap, mask, softmax. First, the residual stream before `LAYER`.

# %%
from pali_kit.model import make_attn_mask, positions_from_mask
from pali_kit.model.gemma import Block, RMSNorm, apply_rope, softcap

cfg, module = model.config.llm, pk.PaliGemma(model.config)
LAYER = cfg.depth // 2
prompt = tok.encode_prompts([ptok.caption("en")], bucket=None)["text"][0]  # int32 [T]
T = len(prompt)
out = model.generate(image, ptok.caption("en"), max_new_tokens=16)[0]
ans = [t for t in out.tokens.tolist() if t != tok.eos_id] or [tok.eos_id]
text = np.concatenate([prompt, ans])[None]  # prompt + answer: int32 [1, T + A]
text_ar = np.array([0] * T + [1] * len(ans))[None]  # the answer is causal
S = N + text.shape[1]  # the sequence: image, prompt, answer
full_ar = np.concatenate([np.zeros((1, N), int), text_ar], axis=1)  # image tokens: prefix
seq_mask = make_attn_mask(np.ones((1, S), bool), full_ar)  # bool [1, S, S]
positions = positions_from_mask(np.ones((1, S), bool))  # 0 .. S-1
embed_text = module.apply({"params": model.params}, text, method="embed_text")
x = jnp.concatenate([model.embed_image(pixels), embed_text], axis=1)  # float32 [1, S, W]
print(f"{N} image + {T} prompt + {len(ans)} answer tokens: x {x.shape}, mask {seq_mask.shape}")

# %%
layer = lambda i: jax.tree.map(lambda a: a[i], model.params["llm"]["layers"])  # slice layer i
run_layer = jax.jit(lambda p, x: Block(cfg).apply({"params": p}, x, positions, seq_mask)[0])
for i in range(LAYER):
    x = run_layer(layer(i), x)  # the residual stream entering layer LAYER

# %% [markdown]
# A check that this hand-made loop is the model: the remaining layers, the final
# norm and the tied output projection give `model.logits` back.

# %%
h = x
for i in range(LAYER, cfg.depth):
    h = run_layer(layer(i), h)
h = RMSNorm(cfg.norm_eps).apply({"params": model.params["llm"]["final_norm"]}, h)
table = model.params["llm"]["embedder"]["input_embedding"].astype(jnp.float32)  # [V, W]
logits = softcap(h[:, N:] @ table.T, cfg.final_logits_softcap)  # text positions only
reference = model.logits(pixels, text, text_ar)
print("largest difference to model.logits:", float(jnp.abs(logits - reference).max()))

# %%
p = layer(LAYER)
h = RMSNorm(cfg.norm_eps).apply({"params": p["pre_attention_norm"]}, x)  # what attention reads
w_q = p["attn"]["q_einsum"]["w"].astype(jnp.float32)  # [heads, W, H]
w_k = p["attn"]["kv_einsum"]["w"][0].astype(jnp.float32)  # [kv heads, W, H]
q = apply_rope(jnp.einsum("bsd,ndh->bsnh", h, w_q), positions, cfg.rope_base) * cfg.query_scale
k = apply_rope(jnp.einsum("bsd,kdh->bskh", h, w_k), positions, cfg.rope_base)
k = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2)  # a kv head serves several q heads
scores = softcap(jnp.einsum("bqnh,bknh->bnqk", q, k), cfg.attn_logits_softcap)
probs = jax.nn.softmax(jnp.where(seq_mask[:, None], scores, -jnp.inf), -1)  # [1, heads, S, S]
to_image = probs[0, :, N + T:, :N].mean(axis=0)  # answer tokens -> image tokens, mean over heads
share = float(to_image.sum(-1).mean())
print(f"layer {LAYER}: {share:.0%} of the answer tokens' attention goes to the image")

# %% [markdown]
# Each image token is one patch, in row-major order, so an answer token's attention
# over the image tokens is a `grid` x `grid` map that can be laid over the picture.

# %%
grid = model.config.vision.grid
picture = pk.images.load_image(image)  # the original: the model's square input maps onto it
H, W = picture.shape[:2]
shown = list(range(min(len(ans), 5)))
fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3 * (len(shown) + 1), 3))
maps = [to_image.mean(0)] + [to_image[j] for j in shown]  # [N] each
titles = ["whole answer"] + [repr(tok.decode([ans[j]])) for j in shown]
for ax, heat, title in zip(axes, maps, titles):
    ax.imshow(picture)
    ax.imshow(np.asarray(heat).reshape(grid, grid), extent=(0, W, H, 0), cmap="inferno", alpha=0.6)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %%
print(f"this notebook ran in {time.perf_counter() - START:.0f} s on {pk.machine()}")

# %% [markdown]
# ## Next
#
# Back to [1. Inference](01_inference.ipynb), or try the prompt panel with your own
# images. The code behind every cell lives in `pali_kit/`: `model/` (the Flax
# modules), `decode.py` (the cache and the samplers), `train/` (fine-tuning;
# `train/step.py` holds the step).
