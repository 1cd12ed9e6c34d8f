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
# # 2. Detection and segmentation
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/pali-kit/pali_kit/blob/main/notebooks/02_detection_segmentation.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/pali-kit/pali_kit/blob/main/notebooks/02_detection_segmentation.ipynb)
#
# PaliGemma answers `detect` and `segment` prompts with text: four `<loc>` tokens
# per box and sixteen `<seg>` tokens per mask. This chapter reads such answers,
# draws them, turns boxes into tokens and back, encodes a mask into 16 codes with
# the VQ-VAE and decodes it again, and builds training targets from annotations.
# Then the one-call way: `model.detect` / `model.segment` with constrained decoding
# (answers that always parse) and a score per object, and a precision-recall curve
# from those scores. Last, it measures the model's boxes and masks on held-out
# scenes of its world, and shows why a photo is another matter.
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
import numpy as np

import pali_kit as pk
from pali_kit import data as pdata
from pali_kit import tokenizer as ptok

START = time.perf_counter()
print(f"jax {jax.__version__} | {jax.default_backend()} ({jax.devices()[0].device_kind}) "
      f"| {jax.device_count()} device(s) | {pk.machine()} | pali_kit {pk.__version__}")

# %% [markdown]
# ## The model and the mask decoder
#
# `MODEL = "demo"` is the kit's tiny shapes model; on a GPU runtime set a real
# checkpoint such as `"paligemma2-3b-mix-224"` (Kaggle credentials: see chapter 1;
# `pk.device_dtype()` picks float16 on a T4, bfloat16 on a TPU). The sample images
# come with their ground truth.

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
# Masks need the VQ-VAE that turns 16 `<seg>` codes into a 64x64 mask. The demo
# model comes with its own small one (`data/vae.npz`, trained on the same shapes).
# The real checkpoints use big_vision's `vae-oid.npz`
# (`gs://big_vision/paligemma/vae-oid.npz`), which the next cell downloads once
# when `MODEL` is not the demo.

# %% tags=["setup"]
from pathlib import Path

from pali_kit import detection as pdet
from pali_kit import metrics
from pali_kit import segmentation as pseg

if MODEL == "demo":
    vae = pk.load_vae("demo")
else:
    VAE_FILE = Path("vae-oid.npz")
    if not VAE_FILE.exists():
        import urllib.request

        url = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"
        urllib.request.urlretrieve(url, VAE_FILE)
    vae = pk.load_vae(VAE_FILE)
print(f"{vae.source}: {vae.num_codes} codes of width {vae.codebook_dim}, encoder {vae.has_encoder}")

# %% [markdown]
# ## Prompts and raw answers
#
# `detect a ; b` asks for boxes around every `a` and every `b`; `segment a` asks for
# masks. An answer lists objects separated by `" ; "`; each object is four
# `<locNNNN>` tokens, **y first**: `ymin, xmin, ymax, xmax`, each a bin of 1/1024 of
# the image side, then (for `segment`) sixteen `<segNNN>` codes, then the label.
# The location and segmentation tokens are ordinary vocabulary entries: the last
# 1024 + 128 ids of the vocabulary. The decoder emits them like any other token.

# %%
[det, seg] = model.generate(image, [ptok.detect("circle"), ptok.segment("circle")],
                            max_new_tokens=32)
print(repr(det.prompt), "->", repr(det.text))
print(repr(seg.prompt), "->", repr(seg.text))
print(f"<loc0000> = {tok.loc_id(0)}, <loc1023> = {tok.loc_id(1023)}, "
      f"<seg000> = {tok.seg_id(0)}, <seg127> = {tok.seg_id(127)}, vocabulary {tok.vocab_size}")
kinds = ["loc" if tok.is_loc(t) else "seg" if tok.is_seg(t) else "text" for t in seg.tokens]
print([f"{tok.id_to_piece(int(t))}:{k}" for t, k in zip(seg.tokens, kinds)])

# %% [markdown]
# ## Parsing and drawing boxes
#
# `pk.parse_detections(text, width, height)` turns an answer into `Detection`
# objects with pixel boxes `(x0, y0, x1, y1)`. The model saw the image squashed to
# a square, so the bins map linearly onto the original image: pass its own width
# and height. The parser never raises; it skips whatever is not a well-formed
# object. The model answers best with one label per prompt; each box is compared
# with the true one (IoU: intersection over union).

# %%
picture = pk.images.load_image(image)  # uint8 [H, W, 3]
H, W = picture.shape[:2]
truth = {o["label"]: o["box"] for o in TRUTH[image.name]["objects"]}
outs = model.generate(image, [ptok.detect(label) for label in truth], max_new_tokens=24)
found = [d for out in outs for d in pk.parse_detections(out.text, W, H)[:1]]
for d in found:
    iou = float(metrics.box_iou(np.array(d.box), np.array(truth[d.label], float)))
    print(f"{d.label!r:11} box {tuple(round(v) for v in d.box)}  bins {d.loc_tokens}  IoU {iou:.2f}")
pk.viz.draw_detections(picture, found)

# %% [markdown]
# ## Parsing and drawing masks
#
# `parse_segments` parses the same way and decodes each object's 16 codes with the
# VAE into a 64x64 mask, then resizes it into the object's box: `mask` is a soft
# mask in [0, 1], `binary_mask` its thresholded version (big_vision's rule).

# %%
picture = pk.images.load_image(image)
H, W = picture.shape[:2]
labels = [o["label"] for o in TRUTH[image.name]["objects"]]
outs = model.generate(image, [ptok.segment(label) for label in labels], max_new_tokens=32)
segments = [s for out in outs for s in pseg.parse_segments(out.text, vae, W, H)[:1]]
for s in segments:
    area = None if s.binary_mask is None else int(s.binary_mask.sum())
    print(f"{s.label!r:10} codes {s.seg_codes} mask area {area} px")
pk.viz.draw_detections(picture, segments)

# %% [markdown]
# ## Boxes to tokens and back
#
# A coordinate `v` becomes the bin `round(v / size * 1024)` (clipped to 1023) and a
# bin decodes to `bin / 1024 * size`, so a round trip moves a coordinate by at most
# half a bin. `box_to_loc` writes the tokens; the tokenizer maps each to one id.

# %%
obj = TRUTH[image.name]["objects"][0]
W, H = TRUTH[image.name]["size"]
loc_text = pdet.box_to_loc(obj["box"], W, H)
back = pk.parse_detections(loc_text + " " + obj["label"], W, H)[0].box
print(obj["label"], obj["box"], "->", loc_text, "->", tok.encode(loc_text))
print("back:", tuple(round(v, 2) for v in back))
print(f"largest error {max(abs(a - b) for a, b in zip(obj['box'], back)):.3f} px, "
      f"half a bin is {max(W, H) / 2048:.3f} px")

# %% [markdown]
# ## The VQ-VAE: a mask in 16 tokens
#
# The model does not write masks pixel by pixel. A mask is cropped to its box,
# resized to 64x64, and a small convolutional encoder turns it into a 4x4 grid of
# vectors; each is replaced by the nearest of 128 codebook entries, whose index
# becomes one `<segNNN>` token. The decoder goes back from 16 indices to 64x64.
# Here a ground-truth mask from a synthetic scene (`pali_kit.data.make_scene`)
# makes the round trip.

# %%
scene = pdata.make_scene(7, 0, 224)  # the image, and every object's label, colour, box and mask
obj = scene.objects[0]
crop = pseg.crop_and_resize(obj.mask, obj.box)  # float32 [64, 64]: the box's content
codes = pseg.encode_masks(vae, crop)  # int32 [16]
recon = pseg.reconstruct_masks(vae, codes)  # float32 [64, 64], > 0 inside
pasted = pseg.paste_binary_mask(recon, obj.box, scene.size, scene.size)  # bool [S, S]
print(obj.label, obj.colour, obj.box, "->", codes.tolist())
print(f"mask IoU after the 16-code round trip: {float(metrics.mask_iou(pasted, obj.mask)):.3f}")
pk.viz.show([scene.image, crop > 0.5, recon > 0],
            titles=["scene", f"{obj.label}: true mask 64x64", "decoded from 16 codes"])

# %% [markdown]
# ## Training targets from annotations
#
# To fine-tune on your own boxes and masks (chapter 3), write the answer the model
# should give: `detections_to_text` takes `(label, box)` or `(label, box, codes)`
# and writes the tokens; `mask_to_codes(vae, mask, box)` is the crop-resize-encode
# of the section above. `ShapesDataset` builds its examples exactly this way.

# %%
scene = pdata.make_scene(7, 0, 224)
obj, S = scene.objects[0], scene.size
target = pdet.detections_to_text([(o.label, o.box) for o in scene.objects], S, S)
print(repr(ptok.detect(*[o.label for o in scene.objects])), "->", repr(target))
obj_codes = pseg.mask_to_codes(vae, obj.mask, obj.box)  # crop, resize, encode: 16 ints
seg_target = pdet.detections_to_text([(obj.label, obj.box, obj_codes)], S, S)
print(repr(ptok.segment(obj.label)), "->", repr(seg_target))
example = pdata.ShapesDataset(4, size=224, seed=7, tasks=["detect"])[0]
print("ShapesDataset example 0:", repr(example.prefix), "->", repr(example.suffix))

# %% [markdown]
# ## The one-call way: `model.detect` and `model.segment`
#
# Everything above (prompt, decode, parse, decode the masks) is one call:
# `model.detect(images, labels)` returns one list of objects per image, each with
# `.label` (one of `labels`), `.box` (x0, y0, x1, y1 in pixels of the image you
# gave) and `.score` in [0, 1]: the model's own probability of writing this object
# here, from its token probabilities (docs/detection_scores.md). `labels` is one
# list for every image or one list per image. Here: four held-out scenes (seed
# 12345), enlarged 4x, one drawn shape asked in each; each tag is "label score".

# %%
held_out = [pdata.make_scene(12345, i, model.resolution) for i in range(4)]
big = [sc.image.repeat(4, 0).repeat(4, 1) for sc in held_out]  # boxes come back at this size
asked = [[sc.objects[i % len(sc.objects)].label] for i, sc in enumerate(held_out)]
results = model.detect(big, asked)  # one list of objects per image
for i, (sc, objects) in enumerate(zip(held_out, results)):
    true = {o.label: [4 * v for v in o.box] for o in sc.objects}
    for o in objects:
        iou = float(metrics.box_iou(np.array(o.box), np.array(true[o.label])))
        print(f"scene {i}: {o.label:9} box {tuple(round(v) for v in o.box)} "
              f"score {o.score:.2f}  IoU with the true box {iou:.2f}")
pk.viz.show([pk.viz.draw_detections(im, objs, captions=[f"{o.label} {o.score:.2f}" for o in objs])
             for im, objs in zip(big, results)], cols=4, size=2.8)

# %% [markdown]
# A score is not a promise that the box is right: it is how sure the model is of
# what it wrote, and a wrong box can score high (compare the IoU column). What the
# scores are good for is ranking, which the precision-recall section below measures.
#
# `model.segment` is the same call with masks: each object also has `.mask`, bool
# [H, W] at the size of the image given, decoded from its 16 `<seg>` codes by the
# VQ-VAE (`vae=`; the demo model would find its own).

# %%
results = model.segment(big, asked, vae=vae)
for i, (sc, objects) in enumerate(zip(held_out, results)):
    true = {o.label: o.mask.repeat(4, 0).repeat(4, 1) for o in sc.objects}
    for o in objects:
        iou = float(metrics.mask_iou(o.mask, true[o.label]))
        print(f"scene {i}: {o.label:9} mask {o.mask.shape} {o.mask.dtype}, "
              f"score {o.score:.2f}  mask IoU with the true shape {iou:.2f}")
pk.viz.show([pk.viz.draw_detections(im, objs, captions=[f"{o.label} {o.score:.2f}" for o in objs])
             for im, objs in zip(big, results)], cols=4, size=2.8)

# %% [markdown]
# ## Constrained decoding
#
# A free decoder can write text that does not parse: three `<loc>` tokens, a label
# nobody asked for, an object cut off by the token budget. With `constrained=True`
# (the default of `detect` and `segment`) a token automaton (`pk.constrain`) masks
# the logits at every step inside the compiled decode loop, so that only answers
# of the form `<loc>`x4 label (` ; ` ...) EOS with requested labels can come out;
# it works with every sampler. `pk.constrain.accepts` checks an answer against the
# same automaton. Below: 16 held-out scenes, all drawn shapes asked, sampled hot
# (`temperature(1.5)`) with 2 seeds, without and with the constraint.

# %%
held_out = [pdata.make_scene(12345, i, model.resolution) for i in range(16)]
label_sets = [[o.label for o in sc.objects] for sc in held_out]
constraint = pk.constrain.build(tok, label_sets, task="detect")
enc = tok.encode_prompts([ptok.detect(*s) for s in label_sets], text_len=None, bucket=None)
budget = constraint.min_new_tokens + 2 * constraint.tail  # room for three objects
answers = {}  # (constrained, seed) -> token rows
for constrained in (False, True):
    for seed in (0, 1):
        answers[constrained, seed], _ = model.generate_tokens(
            [sc.image for sc in held_out], enc["text"], enc["mask_input"], max_new_tokens=budget,
            sampler="temperature(1.5)", seed=seed, constraint=constraint if constrained else None)
for constrained in (False, True):
    ok = [pk.constrain.accepts(constraint, i, list(row), budget)
          for seed in (0, 1) for i, row in enumerate(answers[constrained, seed])]
    print(f"constrained={constrained!s:5}: {sum(ok)} of {len(ok)} answers parse")

# %% [markdown]
# The first unconstrained answer (seed 0) that does not parse, and the constrained
# answer to the same prompt with the same seed: the sampler's random numbers are
# the same, only the tokens the automaton forbids are masked.

# %%
free, kept = answers[False, 0], answers[True, 0]
bad = next((i for i, row in enumerate(free)
            if not pk.constrain.accepts(constraint, i, list(row), budget)), 0)
for name, row in (("unconstrained", free[bad]), ("constrained", kept[bad])):
    text = tok.decode([int(t) for t in row if t != tok.eos_id and t != 0])
    print(f"{name:13} {text!r}")
    print(f"{'':13} parses: {pk.constrain.accepts(constraint, bad, list(row), budget)}")
print("asked:", ptok.detect(*label_sets[bad]))

# %% [markdown]
# ## Precision and recall with the scores
#
# The scores rank the objects: sort all boxes by score, walk down the list, and at
# each step count precision (the fraction of boxes so far that are right: IoU >= 0.5
# with an unmatched true box of their label) and recall (the fraction of true boxes
# found). `pk.metrics.precision_recall(predictions, ground_truths)` gives COCO's
# interpolated curve at IoU 0.5 (101 recall points); its mean is AP50. With every
# score equal there is no ranking to use, and AP50 drops. 48 held-out scenes, one
# drawn shape asked in each:

# %%
import matplotlib.pyplot as plt

held_out = [pdata.make_scene(12345, i, model.resolution) for i in range(48)]
asked = [[sc.objects[i % len(sc.objects)].label] for i, sc in enumerate(held_out)]
preds = model.detect([sc.image for sc in held_out], asked)
truths = [[(o.label, o.box) for o in sc.objects if o.label in a] for sc, a in zip(held_out, asked)]
constant = [[(o.label, o.box, 1.0) for o in objects] for objects in preds]  # same boxes, no ranking
fig, ax = plt.subplots(figsize=(4.5, 3.5))
for name, p in (("scores", preds), ("constant scores", constant)):
    curve = metrics.precision_recall(p, truths)
    ax.plot(curve["recall"], curve["precision"], label=name)
    print(f"{name:15}: AP50 {curve['precision'].mean():.3f} "
          f"(detection_map: {metrics.detection_map(p, truths)['map50']:.3f})")
print(f"{sum(map(len, preds))} boxes, {sum(map(len, truths))} true boxes")
ax.set(xlabel="recall", ylabel="precision", title="IoU 0.5, held-out scenes")
ax.legend()
plt.show()

# %% [markdown]
# ## How good are its boxes and masks?
#
# Measured on held-out scenes of the model's own world (seed 12345; it trained on
# seed 0), with the rule the README quotes: an answer is right when its first box
# has the asked label and IoU >= 0.5 with the true box (for `segment`, the decoded
# mask IoU >= 0.5 with the drawn shape). `pdata.score_shapes` asks one object per
# scene, at the model's resolution.

# %%
start = time.perf_counter()
scores = pdata.score_shapes(model, 50, seed=12345, tasks=("detect", "segment"), vae=vae)
print(f"held-out scenes, 50 per task: detect {scores['detect']:.2f}, "
      f"segment {scores['segment']:.2f} (fraction right; {time.perf_counter() - start:.0f} s)")

# %% [markdown]
# Eight of those scenes (enlarged), each with the true box of the asked object and
# the model's box, and whether the answer counts as right:

# %%
S = model.resolution
shapes = pdata.ShapesDataset(8, size=S, seed=12345, tasks=["detect"])
examples = [shapes[i] for i in range(8)]
outs = model.generate([e.image for e in examples], [e.prefix for e in examples], max_new_tokens=24)
pictures, titles = [], []
for e, out in zip(examples, outs):
    [obj] = e.meta["objects"]
    found = pk.parse_detections(out.text, 4 * S, 4 * S)[:1]  # boxes in the 4x enlarged image
    true = pdet.Detection.from_box(f"true {obj.label}", [4 * v for v in obj.box], 4 * S, 4 * S)
    iou = float(metrics.box_iou(np.array(found[0].box), np.array(true.box))) if found else 0.0
    right = bool(found) and found[0].label == obj.label and iou >= 0.5
    pictures.append(pk.viz.draw_detections(e.image.repeat(4, 0).repeat(4, 1), [true, *found]))
    titles.append(f"{e.prefix}: IoU {iou:.2f}, {'right' if right else 'wrong'}")
pk.viz.show(pictures, titles=titles, cols=4, size=2.8)

# %% [markdown]
# ## Why photos fail
#
# The last sample image is a photo-like picture of the same three shapes: grey,
# shaded, with shadows, texture and noise. The demo model has 1.5 M parameters and
# has seen nothing but flat shapes in four pure colours on a plain background, so
# its features for "where is the circle" do not transfer. The real checkpoints
# were pretrained on billions of photos; a model this small learns only its world.

# %%
name = next(n for n, t in TRUTH.items() if not t["in_domain"])
photo, truth = pk.asset_dir() / "images" / name, TRUTH[name]
W, H = truth["size"]
outs = model.generate(photo, [ptok.detect(o["label"]) for o in truth["objects"]], max_new_tokens=24)
found = [d for out in outs for d in pk.parse_detections(out.text, W, H)[:1]]
for o in truth["objects"]:
    got = [d.box for d in found if d.label == o["label"]]
    iou = float(metrics.box_iou(np.array(got[0]), np.array(o["box"], float))) if got else 0.0
    print(f"{o['label']:9} IoU with the true box {iou:.2f}")
pk.viz.show([pk.viz.draw_detections(pk.images.load_image(photo), found)],
            titles=[f"{name}: the model's boxes"])

# %%
print(f"this notebook ran in {time.perf_counter() - START:.0f} s on {pk.machine()}")

# %% [markdown]
# ## Next
#
# [3. Fine-tuning](03_finetuning.ipynb): teach the model a new skill, from a jsonl
# file of examples.
