"""Batches of numpy arrays: ``collate``, the resumable ``Batcher``, ``batches``, ``eval_batches``.

Batches are a pure function of (seed, step): epoch ``e`` visits the examples in
the order ``np.random.default_rng((seed, e)).permutation(n)``, so a run
restarted with ``start_step=k`` sees exactly the batches of an uninterrupted
run. A background thread prepares a few batches ahead (``Prefetch``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from ..errors import positive_int
from .examples import DataError, Example, get_example
from .prefetch import Prefetch

Batch = dict[str, np.ndarray]


def collate(
    examples: Sequence[Example], tokenizer, *, text_len: int, image_size: int, truncate: bool = True
) -> Batch:
    """Examples -> one training batch of numpy arrays (B = len(examples)).

    Returns:
      ``image`` float32 [B, S, S, 3] in [-1, 1]; ``text`` int32 [B, text_len + 1];
      ``mask_ar``, ``mask_loss`` int32 [B, text_len + 1]; ``mask_input`` bool
      [B, text_len + 1] (``Tokenizer.encode_examples``: longer examples are cut
      with a warning, or raise when ``truncate=False``).
    """
    images = np.stack([ex.pixels(image_size) for ex in examples])
    try:
        text = tokenizer.encode_examples(
            [ex.prefix for ex in examples],
            [ex.suffix for ex in examples],
            text_len=text_len,
            truncate=truncate,
        )
    except ValueError as error:
        raise DataError(f"{error} (examples: {_sources(examples)})") from error
    return {"image": images, **text}


def _sources(examples: Sequence[Example], limit: int = 8) -> str:
    names = [ex.source or "?" for ex in examples[:limit]]
    return ", ".join(names) + (", ..." if len(examples) > limit else "")


class Batcher:
    """Deterministic, resumable training batches over a dataset.

    Step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``;
    epoch ``e`` visits the dataset in the order ``default_rng((seed, e))
    .permutation(n)`` (``shuffle=False``: 0..n-1) and asks the dataset for
    ``example(i, epoch=e)``. ``batch(step)`` depends on nothing else, so
    ``iterate(start_step=k)`` continues a run exactly where step k left it.

    Args:
      dataset: a Dataset, or a list of Example.
      tokenizer: a ``pali_kit.Tokenizer``.
      batch_size: examples per batch (B).
      text_len: the model sees ``text_len`` tokens; arrays have ``text_len + 1``.
      image_size: the model resolution S.
      seed: shuffling seed.
      epochs: stop after this many epochs; None repeats forever.
      shuffle: a new random order every epoch (default True).
      drop_remainder: skip the last, smaller batch of each epoch (default
        True: every batch has B rows, so jitted steps compile once). With
        False that batch has ``n % B`` rows.
      prefetch: batches prepared ahead on a background thread (0: none).
      start_step: the first step ``iter(batcher)`` yields.
    """

    def __init__(
        self,
        dataset: Sequence,
        tokenizer,
        *,
        batch_size: int,
        text_len: int,
        image_size: int,
        seed: int = 0,
        epochs: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
        prefetch: int = 2,
        start_step: int = 0,
    ):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size = positive_int(batch_size, "batch_size")
        self.text_len, self.image_size = text_len, image_size
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle
        self.drop_remainder, self.prefetch, self.start_step = drop_remainder, prefetch, start_step
        n = len(dataset)
        if n == 0:
            raise ValueError("the dataset is empty")
        if drop_remainder and n < self.batch_size:
            raise ValueError(
                f"the dataset has {n} examples, fewer than batch_size={batch_size}: every batch "
                "would be dropped; lower batch_size or pass drop_remainder=False"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be a positive int or None, got {epochs!r}")
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (
            f"Batcher({len(self.dataset)} examples, batch_size={self.batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, seed={self.seed})"
        )

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_remainder else math.ceil(n / b)

    @property
    def num_steps(self) -> int | None:
        """Total steps for ``epochs`` epochs; None when repeating forever."""
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """int [n]: the dataset indices in the order epoch ``epoch`` visits them."""
        cached = self._order_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = len(self.dataset)
        order = (
            np.random.default_rng((self.seed, epoch)).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        self._order_cache = (epoch, order)
        return order

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, dataset indices int [B]) of batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, self.order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def examples(self, step: int) -> list[Example]:
        """The examples of batch ``step`` (to look at what the model is fed)."""
        epoch, indices = self.indices(step)
        return [get_example(self.dataset, int(i), epoch) for i in indices]

    def batch(self, step: int) -> Batch:
        """Batch ``step`` as numpy arrays (see ``collate``); a pure function of the step."""
        return collate(
            self.examples(step), self.tokenizer, text_len=self.text_len, image_size=self.image_size
        )

    def iterate(self, start_step: int | None = None) -> Prefetch:
        """Batches from ``start_step`` (default ``self.start_step``) on, prefetched.

        The iterator's ``position`` is the step of the batch ``next()`` returns next.
        """
        start = self.start_step if start_step is None else start_step
        end = self.num_steps
        steps = range(start, end) if end is not None else itertools.count(start)
        return Prefetch((self.batch(s) for s in steps), self.prefetch, position=start)

    def __iter__(self) -> Prefetch:
        return self.iterate()


def batches(
    dataset: Sequence,
    tokenizer,
    *,
    batch_size: int,
    text_len: int,
    image_size: int,
    seed: int = 0,
    epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    prefetch: int = 2,
    start_step: int = 0,
) -> Prefetch:
    """Training batches: ``iter(Batcher(...))``; see ``Batcher`` for the arguments.

    Yields dicts: ``image`` float32 [B, S, S, 3] in [-1, 1]; ``text`` int32
    [B, text_len + 1]; ``mask_ar``, ``mask_loss`` int32 [B, text_len + 1];
    ``mask_input`` bool [B, text_len + 1].
    """
    return Batcher(
        dataset, tokenizer, batch_size=batch_size, text_len=text_len, image_size=image_size,
        seed=seed, epochs=epochs, shuffle=shuffle, drop_remainder=drop_remainder,
        prefetch=prefetch, start_step=start_step,
    ).iterate()  # fmt: skip


def eval_batches(
    dataset: Sequence,
    tokenizer,
    *,
    batch_size: int,
    image_size: int,
    text_len: int | None = None,
    truncate: bool = False,
    prefetch: int = 2,
    epoch: int = 0,
) -> Prefetch:
    """Prompt-only batches over the whole dataset, once, in order; answers kept aside.

    Yields ``(batch, examples)``. ``batch``: ``image`` float32 [B, S, S, 3],
    ``text``/``mask_ar`` int32 [B, T], ``mask_input`` bool [B, T]
    (``Tokenizer.encode_prompts``: T = ``text_len``, or the longest prompt of the
    batch rounded up to 16 when None) and ``_mask`` bool [B], False on padding.
    The last batch is padded to B rows with copies of its last example, so
    shapes stay fixed. ``examples``: the real examples of the batch (rows
    ``0..len(examples)-1``); ``examples[i].suffix`` is row i's reference answer.
    """
    batch_size = positive_int(batch_size, "batch_size")

    def generate():
        n = len(dataset)
        for start in range(0, n, batch_size):
            examples = [
                get_example(dataset, i, epoch) for i in range(start, min(start + batch_size, n))
            ]
            yield (
                _prompt_batch(examples, tokenizer, batch_size, image_size, text_len, truncate),
                examples,
            )

    return Prefetch(generate(), prefetch)


def _prompt_batch(examples, tokenizer, batch_size, image_size, text_len, truncate) -> Batch:
    pad = batch_size - len(examples)
    images = np.stack([ex.pixels(image_size) for ex in examples])
    prompts = [ex.prefix for ex in examples] + [examples[-1].prefix] * pad
    text = tokenizer.encode_prompts(prompts, text_len=text_len, truncate=truncate)
    return {
        "image": np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]),
        **text,
        "_mask": np.arange(batch_size) < len(examples),
    }
