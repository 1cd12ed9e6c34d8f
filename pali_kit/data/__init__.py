"""Training data: jsonl files, COCO annotations, synthetic shapes, and batches of numpy arrays.

    import pali_kit as pk
    from pali_kit import data as pdata

    tok = pk.Tokenizer.demo()
    train = pdata.JsonlDataset("data/sample_dataset/train.jsonl").validate()
    # or: pdata.ShapesDataset(2000, size=64, seed=0)            synthetic shapes
    #     pdata.CocoDataset("instances_val2017.json", "val2017/")  COCO detection
    train[0].prefix, train[0].suffix                  # ('caption en', 'a red circle and ...')

    for batch in pdata.batches(train, tok, batch_size=8, text_len=32, image_size=64, seed=0):
        batch["image"]                                # float32 [8, 64, 64, 3] in [-1, 1]
        batch["text"], batch["mask_loss"]             # int32 [8, 33]: text_len + 1 columns
        break

    val = pdata.JsonlDataset("data/sample_dataset/val.jsonl")
    for batch, examples in pdata.eval_batches(val, tok, batch_size=8, text_len=16, image_size=64):
        ...   # prompts only; examples[i].suffix is the reference answer of row i

A dataset is a sequence of ``Example`` (an image, a ``prefix`` prompt and the
``suffix`` answer, as big_vision's jsonl rows). The datasets here also have
``example(index, epoch)``: COCO shuffles the objects of a target differently
every epoch, the shapes tasks pick another object to ask about. A plain list
of ``Example`` works everywhere a dataset does.

Batches are a pure function of (seed, step): epoch ``e`` visits the examples in
the order ``np.random.default_rng((seed, e)).permutation(n)``, so a run
restarted with ``start_step=k`` sees exactly the batches of an uninterrupted
run. A background thread prepares a few batches ahead (``prefetch``).

Images are read lazily when a batch is built; an unreadable image raises
``DataError`` naming the jsonl file and line. ``JsonlDataset.validate()``
opens every image up front.

One module per concern; every name below is importable from here:

- ``examples.py``: ``Example``, the ``Dataset`` base class, ``DataError``, ``get_example``.
- ``jsonl.py``: ``JsonlDataset`` (big_vision's jsonl rows), ``LineError``.
- ``coco.py``: ``CocoDataset`` (COCO instances -> detect / segment answers; runs the VQ-VAE).
- ``shapes.py``: the synthetic shapes world (``make_scene``, ``shape_task``,
  ``ShapesDataset``, ``quadrant``), ``sample_ground_truth``.
- ``batching.py``: ``collate``, ``Batcher``, ``batches``, ``eval_batches``.
- ``prefetch.py``: ``Prefetch``, the background thread that prepares batches ahead.

Grading a model's answers lives with evaluation (``pali_kit.train.evaluation``);
``score_shapes`` and ``grade_answer`` stay importable from here as well (on
first use they import ``pali_kit.train``: JAX and optax).
"""

from __future__ import annotations

# ``X as X``: names outside ``__all__`` that stay importable as ``pali_kit.data.X``
from .batching import Batch as Batch
from .batching import Batcher, batches, collate, eval_batches
from .coco import CocoDataset, CocoObject
from .examples import DataError, Dataset, Example
from .examples import encode_mask as encode_mask
from .examples import get_example as get_example
from .jsonl import ON_ERROR as ON_ERROR
from .jsonl import JsonlDataset, LineError
from .prefetch import Prefetch
from .shapes import (
    COLOURS,
    SHAPE_TASKS,
    SHAPES,
    Scene,
    Shape,
    ShapesDataset,
    clear_quadrant,
    make_scene,
    quadrant,
    sample_ground_truth,
    shape_task,
)
from .shapes import WHERE_MARGIN as WHERE_MARGIN

__all__ = [
    "DataError",
    "LineError",
    "Example",
    "Dataset",
    "JsonlDataset",
    "CocoDataset",
    "CocoObject",
    "ShapesDataset",
    "Shape",
    "Scene",
    "make_scene",
    "shape_task",
    "SHAPES",
    "COLOURS",
    "SHAPE_TASKS",
    "quadrant",
    "clear_quadrant",
    "sample_ground_truth",
    "grade_answer",
    "collate",
    "Batcher",
    "batches",
    "eval_batches",
    "Prefetch",
]

# model grading, defined in pali_kit.train.evaluation (imported when first asked for)
_GRADING = ("score_shapes", "grade_answer")


def __getattr__(name: str):
    if name in _GRADING:
        from ..train import evaluation

        value = globals()[name] = getattr(evaluation, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_GRADING))
