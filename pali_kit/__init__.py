"""pali_kit: PaliGemma 1 and 2 on JAX, Flax and Optax, for notebooks.

    import pali_kit as pk
    model = pk.load("demo")                       # or "paligemma2-3b-pt-224", a .npz, a HF folder
    print(model.generate(pk.sample_images()["shapes_0.png"], "caption en")[0].text)

``pk.Model`` (what ``pk.load`` returns), the ``pali_kit.model`` package (Flax
modules) and ``pk.PaliGemma`` (the whole network's Flax module) are three
different things; the README's "What is inside" says which is which.

Names are imported lazily so that ``import pali_kit`` stays fast; JAX loads on
first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # configs
    "CHECKPOINTS": "configs",
    "CheckpointInfo": "configs",
    "PaliGemmaConfig": "configs",
    "VisionConfig": "configs",
    "GemmaConfig": "configs",
    "paligemma_config": "configs",
    # model + checkpoints
    "PaliGemma": "model.paligemma",
    "param_shapes": "model.paligemma",
    "init_params": "model.paligemma",
    "load": "api",
    "save": "api",
    "Model": "api",
    "Generation": "api",
    "load_params": "checkpoints",
    "save_params": "checkpoints",
    "export_hf": "hf",
    "CheckpointError": "errors",
    # assets: the demo model, tokenizer and VAE, the sample images
    "asset_dir": "assets",
    "sample_images": "assets",
    "QArray": "quant",
    # text and images
    "Tokenizer": "tokenizer",
    "preprocess": "images",
    # devices
    "device_dtype": "devices",
    "machine": "devices",
    # detection / segmentation
    "parse_detections": "detection",
    "load_vae": "segmentation",
    "reconstruct_masks": "segmentation",
    # errors (docs/errors.md)
    "PaliKitError": "errors",
    "ArgumentError": "errors",
    "ArgumentTypeError": "errors",
    "SamplerError": "errors",
    "PromptTooLongError": "errors",
    "UnknownNameError": "errors",
    "ImageError": "errors",
    "MissingFileError": "errors",
    "ExportFolderError": "errors",
    "NoTokenizerError": "errors",
}

_SUBMODULES = {
    "api", "assets", "configs", "model", "checkpoints", "hub", "hf", "tokenizer", "images", "decode",
    "detection", "segmentation", "viz", "widgets", "data", "train", "metrics", "cli",
    "constrain", "tasks", "errors", "devices", "quant", "vocab", "atomic",
}  # fmt: skip

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'pali_kit' has no attribute {name!r}")


def __dir__():
    return __all__
