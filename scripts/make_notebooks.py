"""Write the four chapter notebooks in notebooks/ from the cells listed here.

    python scripts/make_notebooks.py            # rewrite notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from this script

Each notebook is a list of (markdown, code) cells, so a change to a chapter is
a reviewable diff of this file. Outputs are never stored: CI executes the
notebooks (tests/test_notebooks.py), Colab and Kaggle run them on demand.
Cell ids are derived from the notebook and the cell's position, so writing
twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
REPO = "pali-kit/pali_kit"
GITHUB = f"https://github.com/{REPO}"


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(*parts: str) -> tuple[str, str]:
    """A code cell; several parts (each dedented on its own) are joined line after line."""
    return ("code", "\n".join(textwrap.dedent(part).strip("\n") for part in parts))


def header(file: str, title: str, goal: str, runtime: str) -> tuple[str, str]:
    """Title, the Colab and Kaggle badges, the goal and the runtime."""
    path = f"{REPO}/blob/main/notebooks/{file}"
    return md(
        f"""
        # {title}

        [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{path})
        [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/{path})

        {goal}

        **Runtime:** {runtime}
        """
    )


SETUP_MD = md(
    """
    ## Setup

    Run this cell first. On Colab or Kaggle it clones the kit (the clone brings
    `data/`: sample images, the demo model and its tokenizer) and installs it;
    inside a checkout of the repository `pali_kit` is already installed and the
    cell only prints what JAX sees. Running it again does nothing new.
    """
)

SETUP_CODE = code(
    f"""
    %matplotlib inline
    import importlib.util, os, subprocess, sys

    if "COLAB_TPU_ADDR" in os.environ:  # Colab's legacy remote TPU, which JAX no longer supports
        raise RuntimeError("Colab's legacy TPU runtime is not supported: use a T4 GPU or a TPU v2 runtime")
    if importlib.util.find_spec("pali_kit") is None:  # Colab / Kaggle: install once
        REPO = "{GITHUB}"
        if not os.path.isdir("pali_kit_repo"):  # the clone holds data/: images, demo model, tokenizer
            subprocess.run(["git", "clone", "-q", "--depth=1", REPO, "pali_kit_repo"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "pali_kit_repo"], check=True)
        sys.path.insert(0, os.path.abspath("pali_kit_repo"))  # now; after a restart via the install

    import jax
    import pali_kit as pk
    print(f"jax {{jax.__version__}} | {{jax.default_backend()}} ({{jax.devices()[0].device_kind}}) "
          f"| {{jax.device_count()}} device(s) | pali_kit {{pk.__version__}}")
    """
)

MODEL_LINE = 'MODEL = "demo"  # or "paligemma2-3b-mix-224" on a GPU runtime'

CREDENTIALS_MD = md(
    """
    ## The model

    `MODEL = "demo"` is the tiny PaliGemma 2 that ships with the kit (1.46 M
    parameters, 64 px input). It was trained only on synthetic pictures of
    circles, squares and triangles in four colours, so it captions, counts,
    names colours, detects and segments those shapes, and nothing else. Its
    answers are whatever it says: this notebook shows them, it never checks them.
    (Should `data/demo_model.npz` be missing, `pk.load("demo")` warns and uses a
    random model of the same size: every cell still runs, the answers are noise.)

    To use a real checkpoint, change that one line on a GPU runtime (a free T4
    is enough for the 3B models), e.g. `MODEL = "paligemma2-3b-mix-224"`; any
    name in `pk.CHECKPOINTS` works. The weights come from Kaggle:

    1. Accept the licence on the model page with your Kaggle account:
       [PaliGemma 2](https://www.kaggle.com/models/google/paligemma-2),
       [PaliGemma](https://www.kaggle.com/models/google/paligemma).
    2. **Colab:** in the 🔑 Secrets pane add `KAGGLE_USERNAME` and `KAGGLE_KEY`
       (from kaggle.com → Settings → *Create New Token*) and allow this notebook
       to read them. **Kaggle:** attach the model (*Add Input → Models*) or just
       run; your Kaggle session is used. **Elsewhere:** the environment variables
       of the same names, or `~/.kaggle/kaggle.json`.

    The kit reads the key where it is and never prints it. The first load
    downloads the weights (about 6 GB for a 3B model) into kagglehub's cache.
    """
)

TOKENIZER_FIX = """
    if model.tokenizer is None:  # Kaggle's weights come without it: fetch big_vision's (public)
        import urllib.request
        url = "https://storage.googleapis.com/big_vision/paligemma_tokenizer.model"
        model.tokenizer = pk.Tokenizer(urllib.request.urlretrieve(url, "paligemma_tokenizer.model")[0])
"""

LOAD_CODE = code(
    f"""
    {MODEL_LINE}

    model = pk.load(MODEL, dtype=None if MODEL == "demo" else "bfloat16")  # prints model.summary()
    """,
    TOKENIZER_FIX,
    """
    IMAGES = sorted((pk.tokenizer.data_dir() / "images").glob("shapes_*"))
    print([p.name for p in IMAGES])
    """,
)


def next_md(text: str) -> tuple[str, str]:
    return md(f"## Next\n\n{text}")


# ================================================================================ 1. inference

INFERENCE = [
    header(
        "01_inference.ipynb",
        "1. Inference quick start",
        "Load a PaliGemma, look at how a prompt becomes tokens, and ask it for captions, "
        "answers to questions and text; then batch several images and prompts, try every "
        "sampler, stream an answer, read the log-probability of any answer, open the "
        "interactive prompt panel, and see why trying a new prompt does not compile anything.",
        "runs on CPU with the demo model in about a minute; a free T4 GPU runs the real "
        "PaliGemma 2 3B (set `MODEL` below).",
    ),
    SETUP_MD,
    SETUP_CODE,
    CREDENTIALS_MD,
    LOAD_CODE,
    md(
        """
        `pk.load` returns a `Model`: `config` (a frozen dataclass with big_vision's
        field names), `params` (the official nested parameter tree) and `tokenizer`.
        The sample images in `data/images` are drawn shapes on plain backgrounds; one is
        a JPEG with an EXIF rotation and one is grayscale, which the preprocessing handles.
        """
    ),
    code(
        """
        pictures = [pk.images.load_image(p) for p in IMAGES]  # uint8 [H, W, 3], upright
        titles = [f"{p.name} {a.shape[1]}x{a.shape[0]}" for p, a in zip(IMAGES, pictures)]
        pk.viz.show(pictures, titles=titles)
        """
    ),
    md(
        """
        ## Prompts are short strings

        PaliGemma was trained on a fixed set of task prefixes. The builders in
        `pali_kit.tokenizer` spell them exactly (and check language codes and object
        lists), so a typo does not silently become a prompt the model never saw.
        """
    ),
    code(
        """
        from pali_kit import tokenizer as ptok

        PROMPTS = [
            ptok.caption("en"),                          # a short caption
            ptok.answer("how many shapes"),              # visual question answering
            ptok.answer("what color is the circle"),
            ptok.ocr(),                                  # read the text in the image
            ptok.detect("circle", "square"),             # boxes, chapter 2
        ]
        for p in PROMPTS:
            print(repr(p))
        """
    ),
    md(
        """
        ## What the model reads

        A prompt becomes `[BOS] + tokens(prompt) + tokens("\\n")`: the prompt and the
        newline separator are tokenized separately, as in big_vision. The image's tokens
        go in front of these, and together they form the *prefix*, which the model reads
        with full (bidirectional) attention. The answer comes after the `"\\n"`, one token
        at a time, and ends with EOS.
        """
    ),
    code(
        """
        tok = model.tokenizer
        enc = tok.encode_prompt(ptok.answer("what color is the circle"))
        print("ids:   ", enc["text"].tolist())
        print("pieces:", tok.pieces(enc["text"]))
        print(f"BOS={tok.bos_id} EOS={tok.eos_id} PAD={tok.pad_id} newline={tok.newline_ids} "
              f"vocabulary={tok.vocab_size}")
        """
    ),
    md(
        """
        ## Caption, VQA, OCR

        `model.generate(image, prompts)` answers one or several prompts; one image with
        several prompts is broadcast. It returns one `Generation` per prompt, with the
        `text` (decoded up to EOS), the `tokens` and their `logprobs`. Answers are
        printed with `repr` so that spaces and newlines show. (The demo model never
        learned to read, and the sample images hold no text: `ocr` is there for the
        real checkpoints.)
        """
    ),
    code(
        """
        image = IMAGES[0]
        for out in model.generate(image, PROMPTS[:4], max_new_tokens=24):
            print(f"{out.prompt:35} -> {out.text!r}")
        """
    ),
    md(
        """
        ## Batches

        Several images with one prompt, or equal-length lists of images and prompts that
        pair up: the kit pads the batch and the prompts and decodes all rows together.
        A padded row decodes exactly as it would alone.
        """
    ),
    code(
        """
        outs = model.generate(IMAGES, ptok.caption("en"), max_new_tokens=24)  # every image, one prompt
        pk.viz.image_grid([pk.viz.draw_caption(pic, out.text.strip()) for pic, out in zip(pictures, outs)])
        """
    ),
    code(
        """
        images = [IMAGES[1], IMAGES[2], IMAGES[3]]
        prompts = [ptok.answer("how many shapes"), ptok.answer("what color is the square"), ptok.caption("en")]
        for im, out in zip(images, model.generate(images, prompts, max_new_tokens=24)):
            print(f"{im.name:18} {out.prompt:35} -> {out.text!r}")
        """
    ),
    md(
        """
        ## Sampling

        Samplers are spec strings, as in big_vision: `"greedy"` (the default,
        deterministic), `"temperature(t)"`, `"nucleus(p)"` / `"nucleus(p, t)"`,
        `"top_k(k)"` / `"top_k(k, t)"` and `"beam(n)"`. Random samplers draw from `seed`:
        the same seed gives the same answer, another seed another draw. `score` is the
        answer's total log-probability.
        """
    ),
    code(
        """
        for sampler in ["greedy", "temperature(1.0)", "nucleus(0.9)", "top_k(5)", "beam(3)"]:
            for seed in (0, 1):
                [out] = model.generate(image, ptok.caption("en"), sampler=sampler, seed=seed,
                                       max_new_tokens=24)
                print(f"{sampler:17} seed {seed}: {out.text!r:50.50} log-prob {out.score:7.2f}")
        """
    ),
    md(
        """
        `best_of=n` samples every prompt `n` times and keeps the most likely answer
        (the highest summed log-probability), as big_vision's best-of-n decoding does.
        """
    ),
    code(
        """
        for n in (1, 4):
            [out] = model.generate(image, ptok.caption("en"), sampler="temperature(0.8)", best_of=n,
                                   seed=0, max_new_tokens=24)
            print(f"best_of={n}: {out.text!r:50.50} log-prob {out.score:7.2f}")
        """
    ),
    md(
        """
        ## Streaming

        `model.stream` yields the answer's text piece by piece as tokens come out of the
        decoder (one image, one prompt), which is what the prompt panel shows.
        """
    ),
    code(
        """
        for piece in model.stream(IMAGES[1], ptok.caption("en"), max_new_tokens=24):
            print(piece, end="|", flush=True)  # "|" marks where one piece ends
        """
    ),
    md(
        """
        ## Log-probabilities

        Each generated token comes with its log-probability under the model. A token
        id is shown with its SentencePiece piece (`▁` is a space).
        """
    ),
    code(
        """
        import numpy as np

        [out] = model.generate(image, ptok.answer("what color is the circle"), max_new_tokens=12)
        for t, lp in zip(out.tokens, out.logprobs):
            print(f"{int(t):7d} {tok.id_to_piece(int(t))!r:14} log-prob {lp:7.3f}  p = {np.exp(lp):.3f}")
        print(f"answer {out.text!r}: total log-prob {out.score:.3f}")
        """
    ),
    md(
        """
        The model can also *score* an answer it did not generate: feed
        `[BOS] prompt "\\n" answer [EOS]` through one forward pass (`model.logits`) and
        add up the log-probabilities of the answer's tokens, each predicted from the
        tokens before it. This is the training loss of chapter 3, for one example; it
        ranks candidate answers without generating anything.
        """
    ),
    code(
        """
        import jax

        def answer_logprob(model, image, prompt, answer, text_len=48):
            ex = model.tokenizer.encode_example(prompt, answer, text_len=text_len)  # 1-D arrays
            text, mask_ar, mask_input = (ex[k][None, :-1] for k in ("text", "mask_ar", "mask_input"))
            logp = jax.nn.log_softmax(model.logits(image, text, mask_ar, mask_input), axis=-1)
            targets, weights = ex["text"][1:], ex["mask_loss"][1:]  # next tokens; 1 on answer + EOS
            token_logp = np.take_along_axis(np.asarray(logp[0]), targets[:, None], axis=-1)[:, 0]
            return float(np.sum(token_logp * weights))

        for candidate in ["a red circle", "a blue square", "a yellow triangle", "a cat on a sofa"]:
            print(f"{candidate!r:22} {answer_logprob(model, image, ptok.caption('en'), candidate):8.2f}")
        """
    ),
    md(
        """
        ## The prompt panel

        An interactive panel: pick or upload an image, choose a task, type a question or
        object names, pick a sampler and press *Run*. It shows the exact prompt string,
        streams the answer, draws boxes and masks, and prints the `model.generate` call
        that reproduces the run.
        """
    ),
    code(
        """
        panel = pk.widgets.prompt_panel(model)
        """
    ),
    md(
        """
        The panel is plain Python underneath: set its widgets and call `run()`, which is
        what the *Run* button does.
        """
    ),
    code(
        """
        panel.task.value, panel.text.value = "detect", "circle ; square"
        result = panel.run()
        print(result.prompt, "->", repr(result.text))
        print(panel.code_line())
        """
    ),
    md(
        """
        ## Compiled once

        The first call compiles the model for a batch size, a prompt length and an answer
        budget. Shapes are *bucketed* (batch to a power of two, prompts to a power of two
        of at least 32 tokens, the cache to multiples of 128 slots), so new prompts of a
        similar size reuse the compiled code: only a new bucket compiles again.
        `pali_kit.decode.compile_count()` counts the compilations.
        """
    ),
    code(
        """
        import time
        from pali_kit import decode

        for question in ["what color is the square", "how many triangles are there", "is there a circle"]:
            before, start = decode.compile_count(), time.perf_counter()
            [out] = model.generate(image, ptok.answer(question), max_new_tokens=24)
            print(f"{question!r:32} {time.perf_counter() - start:5.2f} s, "
                  f"new compilations: {decode.compile_count() - before}")
        for n in (6, 7):  # batches of 6 and 7 prompts share the bucket of 8: only the first compiles
            before = decode.compile_count()
            model.generate(image, [ptok.answer("how many shapes")] * n, max_new_tokens=24)
            print(f"a batch of {n}: new compilations: {decode.compile_count() - before}")
        """
    ),
    next_md(
        "[2. Detection and segmentation](02_detection_segmentation.ipynb): what the "
        "`<loc>` and `<seg>` tokens in a `detect` answer mean, and how to draw them."
    ),
]

# ================================================================== 2. detection and segmentation

DETECTION = [
    header(
        "02_detection_segmentation.ipynb",
        "2. Detection and segmentation",
        "PaliGemma answers `detect` and `segment` prompts with text: four `<loc>` tokens per "
        "box and sixteen `<seg>` tokens per mask. This chapter reads such answers, draws them, "
        "turns boxes into tokens and back, encodes a mask into 16 codes with the VQ-VAE and "
        "decodes it again, builds training targets from annotations, and compares the model's "
        "boxes and masks with the ground truth of synthetic scenes.",
        "runs on CPU with the demo model in about a minute; a free T4 GPU runs the real "
        "PaliGemma 2 3B (set `MODEL` below).",
    ),
    SETUP_MD,
    SETUP_CODE,
    md(
        """
        ## The model and the mask decoder

        `MODEL = "demo"` is the kit's tiny shapes model; on a GPU runtime set a real
        checkpoint such as `"paligemma2-3b-mix-224"` (Kaggle credentials: see chapter 1).
        The demo model's answers are shown, never checked.
        """
    ),
    LOAD_CODE,
    md(
        """
        Masks need the VQ-VAE that turns 16 `<seg>` codes into a 64x64 mask. The demo
        model comes with its own small one (`data/vae.npz`, trained on the same shapes).
        The real checkpoints use big_vision's `vae-oid.npz`
        (`gs://big_vision/paligemma/vae-oid.npz`), which the next cell downloads once
        when `MODEL` is not the demo.
        """
    ),
    code(
        """
        from pathlib import Path

        if MODEL == "demo":
            vae = pk.load_vae("demo")
        else:
            VAE_FILE = Path("vae-oid.npz")
            if not VAE_FILE.exists():
                import urllib.request
                urllib.request.urlretrieve(
                    "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz", VAE_FILE)
            vae = pk.load_vae(VAE_FILE)
        print(f"{vae.source}: {vae.num_codes} codes of width {vae.codebook_dim}, encoder {vae.has_encoder}")
        """
    ),
    md(
        """
        ## Prompts and raw answers

        `detect a ; b` asks for boxes around every `a` and every `b`; `segment a` asks for
        masks. An answer lists objects separated by `" ; "`; each object is four
        `<locNNNN>` tokens, **y first**: `ymin, xmin, ymax, xmax`, each a bin of 1/1024 of
        the image side, then (for `segment`) sixteen `<segNNN>` codes, then the label.
        """
    ),
    code(
        """
        from pali_kit import tokenizer as ptok

        image = pk.images.load_image(IMAGES[0])  # uint8 [H, W, 3]
        H, W = image.shape[:2]
        [det] = model.generate(image, ptok.detect("circle", "square", "triangle"), max_new_tokens=40)
        [seg] = model.generate(image, ptok.segment("circle"), max_new_tokens=32)
        print(repr(det.prompt), "->", repr(det.text))
        print(repr(seg.prompt), "->", repr(seg.text))
        """
    ),
    md(
        """
        The location and segmentation tokens are ordinary vocabulary entries: the last
        1024 + 128 ids of the vocabulary (`<loc0000>` is id 256000 in the official
        tokenizer). The decoder emits them like any other token.
        """
    ),
    code(
        """
        tok = model.tokenizer
        print(f"<loc0000> = {tok.loc_id(0)}, <loc1023> = {tok.loc_id(1023)}, "
              f"<seg000> = {tok.seg_id(0)}, <seg127> = {tok.seg_id(127)}, vocabulary {tok.vocab_size}")
        kinds = ["loc" if tok.is_loc(t) else "seg" if tok.is_seg(t) else "text" for t in seg.tokens]
        print([f"{tok.id_to_piece(int(t))}:{k}" for t, k in zip(seg.tokens, kinds)])
        """
    ),
    md(
        """
        ## Parsing and drawing boxes

        `pk.parse_detections(text, width, height)` turns the answer into `Detection`
        objects with pixel boxes `(x0, y0, x1, y1)`. The model saw the image squashed to a
        square, so the bins map linearly onto the original image: pass its own width and
        height. The parser never raises; it skips whatever is not a well-formed object.
        """
    ),
    code(
        """
        objects = pk.parse_detections(det.text, W, H)
        for o in objects:
            print(f"{o.label!r:12} box {tuple(round(v) for v in o.box)}  bins {o.loc_tokens}")
        pk.viz.draw_detections(image, objects)
        """
    ),
    md(
        """
        ## Parsing and drawing masks

        `parse_segments` parses the same way and decodes each object's 16 codes with the
        VAE into a 64x64 mask, then resizes it into the object's box: `mask` is a soft
        mask in [0, 1], `binary_mask` its thresholded version (big_vision's rule).
        """
    ),
    code(
        """
        from pali_kit import segmentation as pseg

        segments = pseg.parse_segments(seg.text, vae, W, H)
        for s in segments:
            area = None if s.binary_mask is None else int(s.binary_mask.sum())
            print(f"{s.label!r:10} codes {s.seg_codes} mask area {area} px")
        pk.viz.draw_detections(image, segments)
        """
    ),
    md(
        """
        ## Boxes to tokens and back

        A coordinate `v` becomes the bin `round(v / size * 1024)` (clipped to 1023) and a
        bin decodes to `bin / 1024 * size`, so a round trip moves a coordinate by at most
        half a bin. `box_to_loc` writes the tokens; the tokenizer maps each to one id.
        """
    ),
    code(
        """
        from pali_kit import detection as pdet

        box = (30, 40, 110, 120)  # the red circle of shapes_0.png: x0, y0, x1, y1 in pixels
        text = pdet.box_to_loc(box, W, H)
        back = pk.parse_detections(text + " circle", W, H)[0].box
        print(text, "->", tok.encode(text))
        print("back:", tuple(round(v, 2) for v in back))
        print(f"largest error {max(abs(a - b) for a, b in zip(box, back)):.3f} px, "
              f"half a bin is {max(W, H) / 2048:.3f} px")
        """
    ),
    md(
        """
        ## The VQ-VAE: a mask in 16 tokens

        The model does not write masks pixel by pixel. A mask is cropped to its box,
        resized to 64x64, and a small convolutional encoder turns it into a 4x4 grid of
        vectors; each is replaced by the nearest of 128 codebook entries, whose index
        becomes one `<segNNN>` token. The decoder goes back from 16 indices to 64x64.
        Here a ground-truth mask from a synthetic scene (`pali_kit.data.ShapesDataset`)
        makes the round trip. The scenes are drawn at 224 px; the model resizes them.
        """
    ),
    code(
        """
        from pali_kit import data as pdata

        S = 224
        shapes = pdata.ShapesDataset(16, size=S, seed=7, tasks=["detect_all"])
        scene = shapes.scene(0)  # the image, and every object's label, colour, box and mask
        obj = scene.objects[0]
        crop = pseg.crop_and_resize(obj.mask, obj.box)  # float32 [64, 64]: the box's content
        codes = pseg.encode_masks(vae, crop)            # int32 [16]
        recon = pseg.reconstruct_masks(vae, codes)      # float32 [64, 64], > 0 inside
        print(obj.label, obj.colour, obj.box, "->", codes.tolist())
        pk.viz.show([scene.image, crop > 0.5, recon > 0],
                    titles=["scene", f"{obj.label}: true mask 64x64", "decoded from 16 codes"])
        """
    ),
    code(
        """
        from pali_kit import metrics

        pasted = pseg.paste_binary_mask(recon, obj.box, S, S)  # bool [S, S]: back into its box
        print(f"mask IoU after the 16-code round trip: {float(metrics.mask_iou(pasted, obj.mask)):.3f}")
        """
    ),
    md(
        """
        ## Training targets from annotations

        To fine-tune on your own boxes and masks (chapter 3), write the answer the model
        should give: `detections_to_text` takes `(label, box)` or `(label, box, codes)`
        and writes the tokens; `mask_to_codes(vae, mask, box)` is the crop-resize-encode
        of the cell above. `ShapesDataset` builds its examples exactly this way.
        """
    ),
    code(
        """
        labels = [o.label for o in scene.objects]
        target = pdet.detections_to_text([(o.label, o.box) for o in scene.objects], S, S)
        print(repr(ptok.detect(*labels)), "->", repr(target))
        obj_codes = pseg.mask_to_codes(vae, obj.mask, obj.box)  # crop, resize, encode: 16 ints
        seg_target = pdet.detections_to_text([(obj.label, obj.box, obj_codes)], S, S)
        print(repr(ptok.segment(obj.label)), "->", repr(seg_target))
        example = shapes[0]
        print("ShapesDataset example 0:", repr(example.prefix), "->", repr(example.suffix))
        """
    ),
    md(
        """
        ## Predictions against the truth

        Ask the model to detect every object of a few scenes, and draw its boxes below
        the true ones. The box IoU of each true object with the model's best box of the
        same label measures how close it came (0 when it found none).
        """
    ),
    code(
        """
        scenes = [shapes.scene(i) for i in range(4)]
        prompts = [ptok.detect(*[o.label for o in s.objects]) for s in scenes]
        outs = model.generate([s.image for s in scenes], prompts, max_new_tokens=40)
        preds = [pk.parse_detections(o.text, S, S) for o in outs]
        truth = [[pdet.Detection.from_box(o.label, o.box, S, S) for o in s.objects] for s in scenes]
        pk.viz.show([pk.viz.draw_detections(s.image, t) for s, t in zip(scenes, truth)]
                    + [pk.viz.draw_detections(s.image, p) for s, p in zip(scenes, preds)],
                    titles=["truth"] * len(scenes) + ["model"] * len(scenes), size=2.5)
        """
    ),
    code(
        """
        import numpy as np

        for i, (pred, true) in enumerate(zip(preds, truth)):
            for t in true:
                same = [p.box for p in pred if p.label == t.label]
                iou = float(np.max(metrics.box_iou(t.box, np.array(same)))) if same else 0.0
                print(f"scene {i} {t.label:9} best box IoU {iou:.2f}")
        print("COCO box mAP over these scenes:", metrics.detection_map(preds, truth))
        """
    ),
    md(
        """
        The same for masks: segment one object per scene, decode the answer with the VAE
        and compare the mask with the true one.
        """
    ),
    code(
        """
        targets = [s.objects[0] for s in scenes]
        outs = model.generate([s.image for s in scenes], [ptok.segment(t.label) for t in targets],
                              max_new_tokens=32)
        found = [pseg.parse_segments(o.text, vae, S, S) for o in outs]
        empty = np.zeros((S, S), bool)  # when the answer holds no mask
        masks = [f[0].binary_mask if f and f[0].binary_mask is not None else empty for f in found]
        for i, (t, m) in enumerate(zip(targets, masks)):
            print(f"scene {i} {t.label:9} mask IoU {float(metrics.mask_iou(m, t.mask)):.2f}")
        pk.viz.show([t.mask for t in targets] + masks, titles=["true mask"] * 4 + ["model"] * 4, size=2.5)
        """
    ),
    next_md(
        "[3. Fine-tuning](03_finetuning.ipynb): teach the model your own data, "
        "with detection targets built as above."
    ),
]

# ================================================================================ 3. fine-tuning

FINETUNING = [
    header(
        "03_finetuning.ipynb",
        "3. Fine-tuning",
        "Fine-tune PaliGemma on your own data: examples in a jsonl file, a choice of which "
        "weights to train, a memory plan for a free T4, a short training run with previews "
        "of the model's answers as it learns, the loss curve and a metric, and a checkpoint "
        "that loads back with `pk.load`. The weights are the real ones, trained in place "
        "(no adapters), as in big_vision's fine-tuning colab.",
        "about 3 minutes on CPU with the demo model; a free T4 GPU (16 GB) fine-tunes "
        "PaliGemma 2 3B with the reference recipe (set `MODEL` below).",
    ),
    md(
        """
        ## GPU memory

        By default JAX reserves 75 % of a GPU's memory when it starts. Fine-tuning a 3B
        model on a 16 GB T4 needs all of it, so on a GPU let JAX take everything. This
        must run before JAX is imported (i.e. first; restart the runtime if you imported
        it already). On CPU and TPU it changes nothing.
        """
    ),
    code(
        """
        import os, shutil

        if shutil.which("nvidia-smi"):
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "1.00"  # default .75: 3B would not fit a T4
        """
    ),
    SETUP_MD,
    SETUP_CODE,
    md(
        """
        ## The model

        `MODEL = "demo"` trains the kit's tiny shapes model on CPU in a minute or two. On
        a T4, set `"paligemma2-3b-pt-224"` (the pretrained checkpoint, made for
        fine-tuning; Kaggle credentials: see chapter 1). A real model is loaded in
        float16, the dtype its frozen weights keep on a T4 (which has no bfloat16).
        """
    ),
    code(
        f"""
        {MODEL_LINE}

        DEMO = MODEL == "demo"
        model = pk.load(MODEL, dtype=None if DEMO else "float16")  # prints model.summary()
        """,
        TOKENIZER_FIX,
    ),
    md(
        """
        ## Data in jsonl

        One line per example, in big_vision's format: an `image` path (relative to the
        file), the `prefix` (the prompt) and the `suffix` (the answer to learn). Extra keys
        such as `task` are kept in `Example.meta`. `validate()` opens every image up front,
        so a broken file fails here, with its line number, and not in the middle of
        training. The sample dataset asks four questions about each of 20 images.
        """
    ),
    code(
        """
        from pali_kit import data as pdata

        folder = pk.tokenizer.data_dir() / "sample_dataset"
        print(*(folder / "train.jsonl").read_text().splitlines()[:4], sep="\\n")
        train = pdata.JsonlDataset(folder / "train.jsonl").validate()
        val = pdata.JsonlDataset(folder / "val.jsonl").validate()
        print(train, val, sep="\\n")
        """
    ),
    code(
        """
        captions = [ex for ex in train if ex.meta["task"] == "caption"][:6]
        pk.viz.show([pk.images.load_image(ex.image) for ex in captions],
                    titles=[ex.suffix for ex in captions], cols=6, size=2.2)
        """
    ),
    md(
        """
        A `Batcher` turns examples into numpy batches: images resized to the model's
        resolution in [-1, 1], and `[BOS] prefix "\\n" suffix [EOS]` token ids with the
        three masks (chapter 4 draws them). Batch `k` depends only on the seed and `k`,
        so an interrupted run resumes with exactly the same batches.
        """
    ),
    code(
        """
        TEXT_LEN = 32 if DEMO else 128  # prompt + answer tokens; the reference uses 128
        BATCH = 8
        batcher = pdata.Batcher(train, model.tokenizer, batch_size=BATCH, text_len=TEXT_LEN,
                                image_size=model.resolution, seed=0)
        batch = batcher.batch(0)
        print(batcher)
        print({k: (v.shape, v.dtype.name) for k, v in batch.items()})
        print(model.tokenizer.decode(batch["text"][0]), "| mask_loss:", batch["mask_loss"][0].tolist())
        """
    ),
    md(
        """
        ## Which weights to train

        The kit trains a subset of the real weights and freezes the rest: the frozen ones
        get no gradient and no optimizer state, and on a GPU they stay in 16 bits. Presets:
        `"attention"` (the attention projections of the language model, what the
        reference colab trains), `"llm"`, `"img"`, `"all"`; or a regex over parameter
        names such as `"llm/layers/mlp/.*"`. The same summaries for PaliGemma 2 3B come
        from its shapes alone, without allocating it.
        """
    ),
    code(
        """
        from pali_kit import train as pt

        shapes_3b = pk.param_shapes("paligemma2-3b-pt-224")  # jax.ShapeDtypeStruct leaves: no memory
        for subset in ["attention", "llm", "all", "llm/layers/mlp/.*"]:
            print(f"{model.name:>22}: {pt.trainable_mask(model.params, subset)[1]}")
            print(f"{'PaliGemma 2 3B':>22}: {pt.trainable_mask(shapes_3b, subset)[1]}")
        """
    ),
    md(
        """
        ## Will it fit a T4?

        `pt.plan` counts the bytes of the weights, gradients and optimizer state from the
        shapes, and asks XLA how much scratch memory the compiled training step needs,
        without running it or allocating anything (about 10 s of compiling on a CPU). Here:
        PaliGemma 2 3B at 224 px, attention trained, frozen weights in float16, SGD,
        batch 8, 128 tokens: the reference colab's setting.
        """
    ),
    code(
        """
        print(pt.plan("paligemma2-3b-pt-224", trainable="attention", batch_size=8, text_len=128,
                      frozen_dtype="float16", optimizer="sgd"))
        """
    ),
    md(
        """
        `pt.t4_advice` searches for the largest subset that still fits a T4 and the
        largest batch for it (a few more compiles, cached).
        """
    ),
    code(
        """
        print(pt.t4_advice("paligemma2-3b-pt-224", text_len=128))
        """
    ),
    md(
        """
        ## The recipe

        The demo model is tiny, so training all of its weights with AdamW is cheap and
        quick. For a real model the cell uses the reference
        colab's recipe: attention only, SGD with learning rate 0.03, 10 % warm-up then a
        cosine decay, batch 8, 128 tokens. The evaluator greedy-decodes a few validation
        examples and scores them with a metric: here a small one written for this
        dataset (exact match for captions, counts and colours, box IoU for `detect`).
        """
    ),
    code(
        """
        STEPS, EVAL_EVERY = (30, 10) if DEMO else (64, 16)
        RECIPE = (dict(trainable="all", optimizer="adamw", lr=3e-4) if DEMO
                  else dict(trainable="attention", optimizer="sgd", lr=0.03))
        trainer = pt.Trainer(model.params, model.config, num_steps=STEPS, **RECIPE)
        print(trainer.summary)
        print("devices:", trainer.mesh.devices.tolist(), "| frozen weights in", trainer.frozen_dtype)
        """
    ),
    code(
        """
        import numpy as np
        from pali_kit import metrics

        def shapes_metric(predictions, examples):
            exact, ious = [], []
            for pred, ex in zip(predictions, examples):
                if ex.meta["task"] == "detect":  # boxes in [0, 1] coordinates
                    p, t = pk.parse_detections(pred, 1, 1), pk.parse_detections(ex.suffix, 1, 1)
                    ious.append(float(metrics.box_iou(p[0].box, t[0].box)) if p and t else 0.0)
                else:
                    exact.append(metrics.exact_match(pred, ex.suffix))
            return {"exact_match": float(np.mean(exact)), "box_iou": float(np.mean(ious))}

        evaluator = pt.Evaluator(val, model.tokenizer, metric=shapes_metric, max_examples=8,
                                 num_previews=4, max_new_tokens=24)
        """
    ),
    md(
        """
        What the model says before any training (the first validation examples, with
        their prompt, the prediction after `>` and the reference answer):
        """
    ),
    code(
        """
        before = trainer.evaluate(evaluator)
        print(before.scores)
        before.draw(cols=4, size=3)
        """
    ),
    md(
        """
        ## Train, with previews

        `trainer.fit` runs the updates (one jitted step: forward, loss on the answer
        tokens only, gradients of the trainable weights, optimizer update) and evaluates
        every `EVAL_EVERY` steps. Calling it in chunks shows the previews as training goes;
        `fit(num_steps=k)` continues up to step `k`, with the batches it would have had
        in one go. The first chunk includes compiling the step.
        """
    ),
    code(
        """
        from IPython.display import display

        for end in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY):
            trainer.fit(batcher, num_steps=end, evaluator=evaluator, eval_every=EVAL_EVERY, progress=False)
            h = trainer.history
            print(f"step {end}: loss {h.loss[-1]:.3f}, {sum(h.seconds[-EVAL_EVERY:]):.1f} s of steps, "
                  f"{trainer.last_eval.scores}")
            display(trainer.last_eval.draw(cols=4, size=3))
        """
    ),
    md("The training loss at every step (and its running mean), and the validation scores:"),
    code(
        """
        trainer.history.plot(smooth=5)
        """
    ),
    md(
        """
        ## Save and load back

        `trainer.save` writes one `.npz` atomically (a temporary file, then a rename, so
        an interrupted save never leaves half a checkpoint): the weights under
        `params/...` in the official layout, plus the optimizer state and the step, so
        `pt.Trainer.load(path)` could resume the run. `pk.load` reads it like any
        official checkpoint.
        """
    ),
    code(
        """
        import tempfile
        from pathlib import Path

        checkpoint = Path(tempfile.gettempdir()) / "pali_kit_finetune" / f"{MODEL}-finetuned.npz"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save(checkpoint)
        print(f"{checkpoint}: {checkpoint.stat().st_size / 2**20:.1f} MiB")
        """
    ),
    md(
        """
        Load it back as a new model and run the same evaluation on it: the evaluator is a
        plain function of the weights and the config. The trainer and the original model
        are deleted first, which frees their memory (a T4 holds only one more copy of a 3B
        model). Before training, after training, and the reference answer:
        """
    ),
    code(
        """
        tok = model.tokenizer
        del trainer, model  # free the weights they hold
        tuned = pk.load(checkpoint, tokenizer=tok, dtype=None if DEMO else "float16")
        after = evaluator(tuned.params, tuned.config)
        print(before.scores, "->", after.scores)
        for ex, b, a in zip(after.examples, before.predictions, after.predictions):
            print(f"{ex.prefix:37} {b!r:28.28} -> {a!r:28.28} reference {ex.suffix!r}")
        """
    ),
    md(
        """
        ## On a free T4 with PaliGemma 2 3B

        Set `MODEL = "paligemma2-3b-pt-224"` at the top, choose a T4 runtime and run the
        notebook again: the same cells then apply the reference recipe, which the plan
        above says fits in about 11 GB:

        * frozen weights in float16, the attention weights trained in float32
          (`trainable="attention"`, 368 M of 3.0 B parameters);
        * SGD, learning rate 0.03, 10 % warm-up and cosine decay, no momentum;
        * batch 8, `text_len=128`, 64 steps; the step recomputes activations in the
          backward pass (`remat=True`, the default) to save memory.

        For your own data, point `JsonlDataset` at your file and pick a metric:
        `pt.Evaluator(val, tok, metric="cider")` for captions (also `"bleu"`, `"vqa"`,
        `"anls"`, `"exact_match"`, `"detection"`, or a function as above). To resume an
        interrupted run, `pt.Trainer.load(checkpoint, trainable=..., num_steps=...)` and
        `fit` again with the same `Batcher`.

        ## On a TPU host (or several GPUs)

        Nothing changes in the code. The trainer puts all local devices in a 1-D mesh
        (`pt.make_mesh()`, the axis `"data"`): each batch is split across the devices
        (data parallel), and every weight and optimizer-state array larger than 4 MiB is
        split along its largest divisible dimension (FSDP), so a v2-8 or v3-8 host holds
        1/8 of the model per core; XLA gathers each layer's weights when it needs them.
        Use a batch size divisible by the number of devices. `pt.plan(...).per_core()`
        gives the memory per core. On several hosts, call `jax.distributed.initialize()`
        first in every process and run the same notebook on each.
        """
    ),
    next_md(
        "[4. Under the hood](04_under_the_hood.ipynb): the parameters, the masks that "
        "the training step uses, the KV cache, and where the model looks in the image."
    ),
]

# =============================================================================== 4. under the hood

UNDER_THE_HOOD = [
    header(
        "04_under_the_hood.ipynb",
        "4. Under the hood",
        "Open the model up: the configuration and every parameter of PaliGemma 2 3B (counted "
        "from shapes, nothing allocated), the image encoder's output, the three masks of a "
        "training example and the prefix-LM attention pattern they make, the special tokens "
        "and positions, a KV cache filled and extended by hand, and the attention of the "
        "answer's tokens over the image, recomputed from the weights in a few lines of `jnp`.",
        "runs on CPU with the demo model in about a minute; a free T4 GPU runs the real "
        "PaliGemma 2 3B (set `MODEL` below).",
    ),
    SETUP_MD,
    SETUP_CODE,
    md(
        """
        ## The model

        The cells below work with the demo model and with a real checkpoint (set `MODEL`
        on a GPU runtime; Kaggle credentials: see chapter 1).
        """
    ),
    LOAD_CODE,
    md(
        """
        ## Configuration and parameters

        A PaliGemma is a SigLIP image encoder whose output is projected to the width of a
        Gemma language model. The configs carry big_vision's field names. Every official
        checkpoint is in the registry `pk.CHECKPOINTS`.
        """
    ),
    code(
        """
        import math
        from collections import Counter
        from pali_kit import checkpoints

        cfg_3b = pk.CHECKPOINTS["paligemma2-3b-pt-224"].config
        print(cfg_3b.vision)
        print(cfg_3b.llm)
        print(len(pk.CHECKPOINTS), "checkpoints, e.g.", sorted(pk.CHECKPOINTS)[:3])
        """
    ),
    md(
        """
        `pk.param_shapes` gives the parameter tree of any config as shapes only
        (`jax.eval_shape`): the 3B model's full table, with no memory used. Layers are
        *stacked*: each per-layer weight has a leading axis of size `depth`, exactly as
        in the official `.npz`.
        """
    ),
    code(
        """
        shapes = checkpoints.flatten(pk.param_shapes(cfg_3b))  # {"llm/layers/...": ShapeDtypeStruct}
        parts = Counter()
        for key, s in shapes.items():
            parts["/".join(key.split("/")[:2])] += math.prod(s.shape)
        for part, n in parts.items():
            print(f"{part:22} {n:>15,}")
        print(f"{'total':22} {sum(parts.values()):>15,}")
        """
    ),
    code(
        """
        print(f"{'parameter':76} {'shape':>20} {'count':>13}")
        for key, s in shapes.items():
            print(f"{key:76} {str(s.shape):>20} {math.prod(s.shape):>13,}")
        """
    ),
    md(
        """
        ## The image encoder

        The image is cut into `patch_size` x `patch_size` patches, one token each
        (224 / 14 = 16, so 256 tokens for the 224 px models; 64 / 8 = 8, so 64 for the demo),
        and SigLIP's output is projected to the LLM's width. These vectors go in front of
        the text embeddings. `jax.eval_shape` gives the 3B model's shapes without running it.
        """
    ),
    code(
        """
        import jax.numpy as jnp

        IMAGE = IMAGES[0]
        pixels = model.preprocess(IMAGE)  # float32 [1, R, R, 3] in [-1, 1]
        print("this model:", pixels.shape, "->", model.embed_image(pixels).shape, "(batch, tokens, width)")
        embed = lambda p, x: pk.PaliGemma(cfg_3b).apply({"params": p}, x, method="embed_image")
        x_3b = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
        z_3b = jax.eval_shape(embed, pk.param_shapes(cfg_3b), x_3b)  # shapes in, shapes out
        print("PaliGemma 2 3B:", x_3b.shape, "->", z_3b.shape)
        """
    ),
    md(
        """
        ## The three masks

        A training example is `[BOS] prefix "\\n" suffix [EOS]`, padded to a fixed length,
        with three masks:

        * `mask_ar`: 0 on the prefix (full attention), 1 on the suffix (each token starts
          a new causal step);
        * `mask_loss`: 1 where the loss is computed, the suffix and EOS;
        * `mask_input`: 1 on real tokens, 0 on padding.
        """
    ),
    code(
        """
        import matplotlib.pyplot as plt
        import numpy as np
        from pali_kit import tokenizer as ptok

        tok = model.tokenizer
        ex = tok.encode_example(ptok.caption("en"), "a red circle", text_len=15)  # 16 columns
        fig, ax = plt.subplots(figsize=(10, 2.2))
        masks = np.stack([ex["mask_ar"], ex["mask_loss"], ex["mask_input"]])  # [3, T]
        ax.imshow(masks, cmap="Blues", vmin=0, vmax=1.4)
        ax.set_yticks(range(3), ["mask_ar", "mask_loss", "mask_input"])
        ax.set_xticks(range(len(ex["text"])), tok.pieces(ex["text"]), rotation=60)
        plt.show()
        """
    ),
    md(
        """
        The attention mask follows from `mask_ar` by big_vision's cumsum rule: token `i`
        may attend to token `j` iff `cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]` (and both
        are real tokens). The image tokens come first with `mask_ar = 0`, so image, BOS,
        prompt and `"\\n"` form one bidirectional block; the answer is causal. Rows are
        queries, columns keys.
        """
    ),
    code(
        """
        from pali_kit.model import make_attn_mask, positions_from_mask

        N = model.config.vision.num_tokens
        input_mask = np.concatenate([np.ones(N, bool), ex["mask_input"]])[None]  # image tokens first
        full_ar = np.concatenate([np.zeros(N, np.int32), ex["mask_ar"]])[None]
        attn = make_attn_mask(input_mask, full_ar)[0]  # bool [N + T, N + T]: (query, key)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(attn, cmap="Greys", interpolation="nearest")
        n_prefix = N + int((ex["mask_ar"] == 0).sum())
        for edge in (N - 0.5, n_prefix - 0.5):
            ax.axhline(edge, color="tab:red", lw=0.8)
            ax.axvline(edge, color="tab:red", lw=0.8)
        ax.set(title=f"image | prefix | suffix + padding  ({N} image tokens)", xlabel="key", ylabel="query")
        plt.show()
        """
    ),
    md(
        """
        ## Tokens and positions

        `<loc>` and `<seg>` are the last 1024 + 128 vocabulary entries. Positions (for the
        rotary embedding) count real tokens only, so padding does not shift them: here
        two prompts of different lengths in one right-padded batch.
        """
    ),
    code(
        """
        print(f"vocabulary {tok.vocab_size}: <loc> ids {tok.loc_ids.start}..{tok.loc_ids.stop - 1}, "
              f"<seg> ids {tok.seg_ids.start}..{tok.seg_ids.stop - 1}")
        answer = "<loc0102><loc0250><loc0870><loc0990> circle"
        print(answer, "->", tok.encode(answer))
        two = [ptok.caption("en"), ptok.answer("what color is the circle")]
        batch = tok.encode_prompts(two, bucket=None)  # right-padded to the longer prompt
        mask = np.concatenate([np.ones((2, N), bool), batch["mask_input"]], axis=1)
        print("mask_input:\\n", batch["mask_input"].astype(int))
        print("their positions (the image has 0..N-1):\\n", positions_from_mask(mask)[:, N:])
        """
    ),
    md(
        """
        ## The KV cache

        Generation runs the prefix (image + prompt) once, keeping every layer's keys and
        values in a cache (`prefill`), then feeds one token at a time (`decode_step`),
        writing its keys and values into the next free slot. These are methods of the
        Flax module, used here directly, with greedy choice of each token.
        """
    ),
    code(
        """
        module = pk.PaliGemma(model.config)
        enc = tok.encode_prompts([ptok.caption("en")], bucket=None)  # int32 [1, T], all prefix
        T, NEW = enc["text"].shape[1], 12
        CACHE = N + T + NEW  # slots: image, prompt, new tokens
        prefill = jax.jit(lambda p, x, t, m: module.apply({"params": p}, x, t, m, CACHE, method="prefill"))
        step = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method="decode_step"))
        logits, cache, valid, pos = prefill(model.params, pixels, enc["text"], enc["mask_input"])
        print(f"{len(cache.k)} layers of keys and values, each {cache.k[0].shape}: (batch, slots, kv heads, H)")
        print(f"slots filled: {int(valid.sum())} of {CACHE}; the next token's position: {pos}")
        """
    ),
    code(
        """
        tokens = []
        for i in range(NEW):
            next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy: int32 [1]
            tokens.append(int(next_token[0]))
            if tokens[-1] == tok.eos_id:
                break
            slot = jnp.int32(N + T + i)  # the next free cache slot
            logits, cache, valid = step(model.params, next_token, cache, valid, pos + i, slot)
        print("cached decoding:", tokens, repr(tok.decode(tokens)))
        [out] = model.generate(IMAGE, ptok.caption("en"), max_new_tokens=NEW)
        print("model.generate: ", out.tokens.tolist())
        """
    ),
    md(
        """
        The cache is only a speed-up: one full forward pass over the prompt followed by
        the generated tokens (`mask_ar` 1 on them: causal) predicts the same tokens,
        position by position.
        """
    ),
    code(
        """
        text = np.concatenate([enc["text"][0], tokens[:-1]])[None]  # prompt + all but the last new token
        mask_ar = np.array([0] * T + [1] * (len(tokens) - 1))[None]
        full = model.logits(pixels, text, mask_ar)  # float32 [1, T + n - 1, V]
        again = np.asarray(full[0, T - 1:].argmax(-1)).tolist()
        print("full forward:   ", again)
        print("same tokens as the cached decoding:", again == tokens)
        """
    ),
    md(
        """
        ## Where the answer looks in the image

        Attention weights are not an output of the model, but they are a few lines of
        `jnp` away. Run the model's own layers (`Block`) on the sequence image + prompt +
        answer up to layer `LAYER`, then recompute that layer's attention scores from its
        weights: normalise, project to queries and keys, rotate them (RoPE), scale,
        softcap, mask, softmax. First, the residual stream before `LAYER`.
        """
    ),
    code(
        """
        from pali_kit.model.gemma import Block, RMSNorm, apply_rope, softcap

        cfg = model.config.llm
        LAYER = cfg.depth // 2
        out = model.generate(IMAGE, ptok.caption("en"), max_new_tokens=16)[0]
        ans = [t for t in out.tokens.tolist() if t != tok.eos_id] or [tok.eos_id]
        text = np.concatenate([enc["text"][0], ans])[None]  # prompt + answer: int32 [1, T + A]
        text_ar = np.array([0] * T + [1] * len(ans))[None]  # the answer is causal
        S = N + text.shape[1]  # the sequence: image, prompt, answer
        full_ar = np.concatenate([np.zeros((1, N), int), text_ar], axis=1)  # image tokens: prefix
        seq_mask = make_attn_mask(np.ones((1, S), bool), full_ar)  # bool [1, S, S]
        positions = positions_from_mask(np.ones((1, S), bool))  # 0 .. S-1
        embed_text = module.apply({"params": model.params}, text, method="embed_text")
        x = jnp.concatenate([model.embed_image(pixels), embed_text], axis=1)  # float32 [1, S, W]
        print(f"{N} image + {T} prompt + {len(ans)} answer tokens: x {x.shape}, mask {seq_mask.shape}")
        """
    ),
    code(
        """
        layer = lambda i: jax.tree.map(lambda a: a[i], model.params["llm"]["layers"])  # slice layer i
        run_layer = jax.jit(lambda p, x: Block(cfg).apply({"params": p}, x, positions, seq_mask)[0])
        for i in range(LAYER):
            x = run_layer(layer(i), x)  # the residual stream entering layer LAYER
        """
    ),
    md(
        """
        A check that this hand-made loop is the model: the remaining layers, the final
        norm and the tied output projection give `model.logits` back.
        """
    ),
    code(
        """
        h = x
        for i in range(LAYER, cfg.depth):
            h = run_layer(layer(i), h)
        h = RMSNorm(cfg.norm_eps).apply({"params": model.params["llm"]["final_norm"]}, h)
        table = model.params["llm"]["embedder"]["input_embedding"].astype(jnp.float32)  # [V, W]
        logits = softcap(h[:, N:] @ table.T, cfg.final_logits_softcap)  # text positions only
        reference = model.logits(pixels, text, text_ar)
        print("largest difference to model.logits:", float(jnp.abs(logits - reference).max()))
        """
    ),
    code(
        """
        p = layer(LAYER)
        h = RMSNorm(cfg.norm_eps).apply({"params": p["pre_attention_norm"]}, x)  # what attention reads
        w_q = p["attn"]["q_einsum"]["w"].astype(jnp.float32)      # [heads, W, H]
        w_k = p["attn"]["kv_einsum"]["w"][0].astype(jnp.float32)  # [kv heads, W, H]
        q = apply_rope(jnp.einsum("bsd,ndh->bsnh", h, w_q), positions, cfg.rope_base) * cfg.query_scale
        k = apply_rope(jnp.einsum("bsd,kdh->bskh", h, w_k), positions, cfg.rope_base)
        k = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=2)  # a kv head serves several q heads
        scores = softcap(jnp.einsum("bqnh,bknh->bnqk", q, k), cfg.attn_logits_softcap)
        probs = jax.nn.softmax(jnp.where(seq_mask[:, None], scores, -jnp.inf), axis=-1)  # [1, heads, S, S]
        to_image = probs[0, :, N + T:, :N].mean(axis=0)  # answer tokens -> image tokens, mean over heads
        share = float(to_image.sum(-1).mean())
        print(f"layer {LAYER}: {share:.0%} of the answer tokens' attention goes to the image")
        """
    ),
    md(
        """
        Each image token is one patch, in row-major order, so an answer token's attention
        over the image tokens is a `grid` x `grid` map that can be laid over the picture.
        """
    ),
    code(
        """
        grid = model.config.vision.grid
        picture = pk.images.load_image(IMAGE)  # the original: the model's square input maps onto it
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
        """
    ),
    next_md(
        "Back to [1. Inference](01_inference.ipynb), or try the prompt panel with your own "
        "images. The code behind every cell lives in `pali_kit/`: `model/` (the Flax "
        "modules), `decode.py` (the cache and the samplers), `train/` (fine-tuning; "
        "`train/step.py` holds the step)."
    ),
]

NOTEBOOKS = {
    "01_inference.ipynb": INFERENCE,
    "02_detection_segmentation.ipynb": DETECTION,
    "03_finetuning.ipynb": FINETUNING,
    "04_under_the_hood.ipynb": UNDER_THE_HOOD,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` as an nbformat v4 node, without outputs."""
    cells = []
    stem = name.split("_")[0]
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.id = f"c{stem}-{i:02d}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    return nb


def render(name: str) -> str:
    """The file content of notebook ``name``."""
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = NOTEBOOKS_DIR / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            NOTEBOOKS_DIR.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
