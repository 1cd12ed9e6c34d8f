"""The examples every dataset yields: ``Example``, the ``Dataset`` base class, ``DataError``.

A dataset is a sequence of ``Example`` (an image, a ``prefix`` prompt and the
``suffix`` answer, as big_vision's jsonl rows). A plain list of ``Example``
(or of dicts with ``image``, ``prefix``, ``suffix``) works everywhere a
dataset does: ``get_example`` reads either.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import images as pimages
from ..errors import PaliKitError


class DataError(PaliKitError, ValueError):
    """Bad training data; the message names the file (and line) and what is wrong."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training example, as a jsonl row: an image, a prompt and its answer.

    Attributes:
      image: a file path (str), or the pixels as uint8 [H, W, 3].
      prefix: the prompt, e.g. ``"caption en"``; the tokenizer adds BOS and "\\n".
      suffix: the answer the model learns, e.g. ``"a red circle"`` ("" is allowed).
      source: where it came from, for messages (``"train.jsonl:12"``).
      meta: everything else: extra jsonl keys, ground-truth objects, the task.
    """

    image: str | np.ndarray
    prefix: str
    suffix: str
    source: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def pixels(self, size: int) -> np.ndarray:
        """The model input: float32 [size, size, 3] in [-1, 1] (``images.preprocess``)."""
        try:
            return pimages.preprocess(self.image, size)[0]
        except pimages.ImageError as error:
            where = f"{self.source}: " if self.source else ""
            name = self.image if isinstance(self.image, str) else "array"
            raise DataError(
                f"{where}image {name}: {error} (JsonlDataset.validate() checks every image "
                "up front; with on_error='skip' it drops the bad lines)"
            ) from error


class Dataset(Sequence):
    """A sized collection of ``Example``; subclasses define ``__len__`` and ``example``.

    ``dataset[i]`` is ``dataset.example(i, epoch=0)``; slices give lists.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, index: int, epoch: int = 0) -> Example:
        """Example ``index`` as seen in epoch ``epoch`` (targets may vary by epoch)."""
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.example(i) for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        return self.example(i)


def get_example(dataset: Sequence, index: int, epoch: int = 0) -> Example:
    """``dataset.example(index, epoch)`` for a Dataset, else ``dataset[index]``.

    Plain sequences may hold ``Example`` objects or dicts with the keys
    ``image``, ``prefix`` and ``suffix``.
    """
    if isinstance(dataset, Dataset):
        return dataset.example(index, epoch)
    item = dataset[index]
    if isinstance(item, Mapping):
        extra = {k: v for k, v in item.items() if k not in ("image", "prefix", "suffix")}
        return Example(item["image"], item["prefix"], item["suffix"], f"item {index}", extra)
    return item


def encode_mask(vae, mask: np.ndarray, box) -> tuple[int, ...]:
    """The 16 ``<seg>`` codes of a segment target: ``mask`` bool [H, W] inside ``box``.

    ``vae`` is a ``MaskVAE`` (its encoder runs: ``segmentation.mask_to_codes``)
    or a function ``(mask, box) -> 16 ints``; ``box`` is (x0, y0, x1, y1) pixels.
    The COCO and shapes datasets call it once per object.
    """
    if callable(vae):
        return tuple(int(c) for c in vae(mask, box))
    from ..segmentation import mask_to_codes  # JAX loads here, not on import

    return mask_to_codes(vae, mask, box)
