"""Text in, token ids out: the PaliGemma tokenizer, prompts and the three masks.

    >>> import pali_kit as pk
    >>> from pali_kit import tokenizer as ptok
    >>> tok = pk.Tokenizer.demo()          # or pk.Tokenizer("paligemma_tokenizer.model")
    >>> tok.encode("caption en")
    [374, 288]
    >>> batch = tok.encode_prompts([ptok.caption("en"), ptok.detect("circle", "square")])
    >>> batch["text"].shape                # int32[B, T], T rounded up to a multiple of 16
    (2, 16)
    >>> ids = [tok.loc_id(12), tok.loc_id(500), tok.loc_id(80), tok.loc_id(900), *tok.encode(" circle")]
    >>> tok.decode(ids + [tok.eos_id, 7, 7])   # stops at EOS; <loc> tokens stay text
    '<loc0012><loc0500><loc0080><loc0900> circle'

Id scheme (official ``paligemma_tokenizer.model``, V = 257,152 pieces):

    0 <pad>   1 <eos>   2 <bos>   3 <unk>        "\\n" is one piece (id 108)
    V - 1152 + i   <loc{i:04d}>   i in [0, 1024)   (256000 + i)
    V - 128 + j    <seg{j:03d}>   j in [0, 128)    (257024 + j)

Any SentencePiece model with that scheme loads, e.g. the small demo tokenizer
``tokenizer.model`` in ``pk.asset_dir()`` (V = 2176, made by the repository's
``scripts/make_tokenizer.py``).

Sequences follow big_vision: prefix, the "\\n" separator and suffix are
tokenized separately and concatenated, and three masks travel with the ids:

    token        <bos> caption  en  "\\n" |  a  red  circle <eos> | pad  pad
    mask_ar        0      0      0    0  |  1   1     1     1   |  1    1
    mask_loss      0      0      0    0  |  1   1     1     1   |  0    0
    mask_input     1      1      1    1  |  1   1     1     1   |  0    0

``mask_ar`` drives attention by the cumsum rule: token i sees token j iff
cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]. Zeros form one bidirectional prefix
block (the image tokens join it); each 1 starts a new causal step.
``mask_loss`` marks the targets; ``mask_input`` marks real (non-padding) tokens.

Length conventions:
  * training (``encode_example(s)``): arrays have ``text_len + 1`` columns, as
    big_vision's ``combine_and_keep_train(text_len)``; the train step feeds
    ``text[:, :-1]`` and predicts ``text[:, 1:]`` with weights ``mask_loss[:, 1:]``.
  * prompts (``encode_prompt(s)``): arrays have ``text_len`` columns, or the
    longest prompt rounded up to a ``bucket`` when no ``text_len`` is given.
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .assets import asset_dir
from .vocab import NUM_LOC, NUM_SEG, from_bin, loc_text, pieces, to_bin

# The 35 caption languages of big_vision's COCO-35L / CC3M-35L configs: English
# and the 34 it was translated into (the "34 languages" of Google's docs).
LANGUAGES = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr",
    "he", "hi", "hr", "hu", "id", "it", "ja", "ko", "mi", "nl", "no", "pl",
    "pt", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Task prompts (spec 5.4). Each is a prefix; the encoders add BOS and "\n".


def _lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language code {lang!r}: use one of {', '.join(LANGUAGES)}")
    return lang


def _text(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} is empty")
    return value.strip()


def _objects(objects: tuple, task: str) -> str:
    if len(objects) == 1 and isinstance(objects[0], (list, tuple)):
        objects = tuple(objects[0])
    if not objects:
        raise ValueError(f"{task}() needs at least one object name, e.g. {task}('cat', 'dog')")
    names = [_text(o, f"{task} object {i}") for i, o in enumerate(objects)]
    for name in names:
        if ";" in name or "\n" in name:
            raise ValueError(f"object name {name!r} may not contain ';' or a newline")
    return " ; ".join(names)


def caption(lang: str = "en") -> str:
    """Short caption prompt: ``"caption en"``."""
    return f"caption {_lang(lang)}"


def cap(lang: str = "en") -> str:
    """Raw short caption prompt (pretrained models): ``"cap en"``."""
    return f"cap {_lang(lang)}"


def describe(lang: str = "en") -> str:
    """Longer description prompt (pretrained models): ``"describe en"``."""
    return f"describe {_lang(lang)}"


def ocr() -> str:
    """Text reading prompt (pretrained models): ``"ocr"``."""
    return "ocr"


def answer(question: str, lang: str = "en") -> str:
    """Visual question answering: ``answer("how many shapes are there")`` -> ``"answer en how ..."``."""
    return f"answer {_lang(lang)} {_text(question, 'question')}"


def question(answer: str, lang: str = "en") -> str:
    """Question generation for a given answer: ``"question en red"``."""
    return f"question {_lang(lang)} {_text(answer, 'answer')}"


def detect(*objects: str) -> str:
    """Detection prompt: ``detect("circle", "square")`` -> ``"detect circle ; square"``."""
    return f"detect {_objects(objects, 'detect')}"


def segment(*objects: str) -> str:
    """Segmentation prompt: ``segment("triangle")`` -> ``"segment triangle"``."""
    return f"segment {_objects(objects, 'segment')}"


# ----------------------------------------------------------------------------
# Normalised boxes (ymin, xmin, ymax, xmax) <-> <loc> tokens; the bin convention
# is pali_kit.vocab's (scale 1024), as pali_kit.detection's for pixel boxes.


def coord_to_bin(v: float) -> int:
    """Normalised coordinate in [0, 1] -> bin in [0, 1023]."""
    v = float(v)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"coordinate {v} is not in [0, 1]: normalise by the image height/width")
    return to_bin(v)


def bin_to_coord(b: int) -> float:
    """Bin in [0, 1023] -> normalised coordinate ``b / 1024``."""
    if not 0 <= b < NUM_LOC:
        raise ValueError(f"location bin {b} is not in [0, {NUM_LOC})")
    return from_bin(b)


def box_to_loc_tokens(box: Sequence[float]) -> str:
    """``(ymin, xmin, ymax, xmax)`` normalised to [0, 1] -> ``"<locYYYY><locXXXX><locYYYY><locXXXX>"``.

    >>> box_to_loc_tokens((0.1, 0.25, 0.5, 1.0))
    '<loc0102><loc0256><loc0512><loc1023>'
    """
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers (ymin, xmin, ymax, xmax), got {len(box)}")
    return loc_text(coord_to_bin(v) for v in box)


_LOC4 = re.compile(r"\s*" + r"<loc(\d{4})>" * 4 + r"\s*")


def loc_tokens_to_box(text: str) -> tuple[float, float, float, float]:
    """``"<locYYYY><locXXXX><locYYYY><locXXXX>"`` -> ``(ymin, xmin, ymax, xmax)`` in [0, 1)."""
    match = _LOC4.fullmatch(text)
    if not match:
        raise ValueError(f"expected exactly four <locXXXX> tokens, got {text!r}")
    return tuple(bin_to_coord(int(g)) for g in match.groups())


# ----------------------------------------------------------------------------
# Helpers for the encoders.


def _strings(values, name: str, *, allow_none: bool = False) -> list:
    """A list of str from a list (or one str = a batch of one); clear errors otherwise."""
    if isinstance(values, str):
        return [values]
    if isinstance(values, (bytes, bytearray)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: pass at least one string")
    for i, v in enumerate(values):
        if not (isinstance(v, str) or (allow_none and v is None)):
            raise TypeError(f"{name}[{i}] is a {type(v).__name__}, not a str: {v!r:.60}")
    return values


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _bucket_length(n: int, bucket: int | str | None) -> int:
    """Round ``n`` up: to a multiple of ``bucket``, to a power of two ("pow2"), or not (None)."""
    if bucket is None:
        return n
    if bucket == "pow2":
        return 1 << (n - 1).bit_length()
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise ValueError(f"bucket must be a positive int, 'pow2' or None, got {bucket!r}")
    return -(-n // int(bucket)) * int(bucket)


def _fit(ids: list[int], mask_ar: list[int], size: int, *, with_loss: bool) -> Batch:
    """Cut or pad one sequence to ``size``: text 0, mask_ar 1, mask_loss 0, mask_input 0."""
    n = min(len(ids), size)
    text = np.zeros(size, np.int32)
    ar = np.ones(size, np.int32)
    real = np.zeros(size, bool)
    text[:n], ar[:n], real[:n] = ids[:n], mask_ar[:n], True
    out = {"text": text, "mask_ar": ar}
    if with_loss:
        out["mask_loss"] = np.where(real, ar, 0).astype(np.int32)
    out["mask_input"] = real
    return out


def _stack(rows: list[Batch]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Tokenizer:
    """SentencePiece with the PaliGemma id scheme; builds prompts and training examples.

    ``Tokenizer(path)`` loads a ``.model`` file and checks the scheme: PAD 0,
    EOS 1, BOS 2, and ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>``
    as the last 1152 pieces. ``Tokenizer.demo()`` loads the demo tokenizer.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e})") from None
        self._setup(sp, str(path))

    @classmethod
    def from_bytes(cls, model_proto: bytes, name: str = "<bytes>") -> Tokenizer:
        """Load a serialized SentencePiece ModelProto (``name`` appears in errors)."""
        try:
            sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{name} is not a SentencePiece model ({e})") from None
        tok = cls.__new__(cls)
        tok._setup(sp, name)
        return tok

    @classmethod
    def demo(cls) -> Tokenizer:
        """The small demo tokenizer, ``tokenizer.model`` in ``pk.asset_dir()``."""
        path = asset_dir() / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"demo tokenizer not found at {path}: set PALI_KIT_DATA to a folder that holds "
                "tokenizer.model, or unset it to use the one installed with the kit"
            )
        return cls(path)

    def _setup(self, sp: spm.SentencePieceProcessor, name: str) -> None:
        self._sp, self.path = sp, name
        self.vocab_size = sp.get_piece_size()
        self.loc_offset = self.vocab_size - NUM_LOC - NUM_SEG
        self.seg_offset = self.vocab_size - NUM_SEG
        self.pad_id, self.eos_id, self.bos_id = 0, 1, 2
        self._check_scheme(name)
        self.newline_ids = tuple(sp.encode("\n"))
        if sp.decode(list(self.newline_ids)) != "\n":
            raise ValueError(f"{name}: its normalizer does not keep '\\n', the prompt separator")

    def _check_scheme(self, name: str) -> None:
        sp = self._sp
        hint = "is this a PaliGemma tokenizer (paligemma_tokenizer.model), not a plain Gemma one?"
        specials = {"pad": (sp.pad_id(), 0), "eos": (sp.eos_id(), 1), "bos": (sp.bos_id(), 2)}
        for what, (got, want) in specials.items():
            if got != want:
                raise ValueError(
                    f"{name}: {what} id is {got}, PaliGemma uses {want}: not a PaliGemma tokenizer"
                )
        if self.loc_offset < 3:
            raise ValueError(
                f"{name}: {self.vocab_size} pieces, too few to end with the 1152 <loc>/<seg> "
                f"pieces; {hint}"
            )
        for i, piece in enumerate(pieces()):
            got = sp.id_to_piece(self.loc_offset + i)
            if got != piece:
                raise ValueError(
                    f"{name}: id {self.loc_offset + i} is {got!r}, expected {piece!r} "
                    f"(<loc0000>..<loc1023>, <seg000>..<seg127> must be the last 1152 pieces); {hint}"
                )
        if sp.encode("<loc0000><seg127>")[-2:] != [self.loc_offset, self.vocab_size - 1]:
            raise ValueError(
                f"{name}: <loc>/<seg> pieces are not USER_DEFINED (text does not map to them)"
            )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, loc_offset={self.loc_offset})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    # -- ids and pieces ------------------------------------------------------

    @property
    def loc_ids(self) -> range:
        """Ids of ``<loc0000>``..``<loc1023>``."""
        return range(self.loc_offset, self.loc_offset + NUM_LOC)

    @property
    def seg_ids(self) -> range:
        """Ids of ``<seg000>``..``<seg127>``."""
        return range(self.seg_offset, self.seg_offset + NUM_SEG)

    def loc_id(self, i: int) -> int:
        """Id of ``<loc{i:04d}>``."""
        i = operator.index(i)
        if not 0 <= i < NUM_LOC:
            raise ValueError(f"loc index {i} is not in [0, {NUM_LOC})")
        return self.loc_offset + i

    def seg_id(self, j: int) -> int:
        """Id of ``<seg{j:03d}>``."""
        j = operator.index(j)
        if not 0 <= j < NUM_SEG:
            raise ValueError(f"seg index {j} is not in [0, {NUM_SEG})")
        return self.seg_offset + j

    def is_loc(self, ids):
        """True where an id is a ``<loc>`` token; bool, or a bool array for an array of ids."""
        ids = np.asarray(ids)
        out = (ids >= self.loc_offset) & (ids < self.seg_offset)
        return bool(out) if out.ndim == 0 else out

    def is_seg(self, ids):
        """True where an id is a ``<seg>`` token; bool, or a bool array for an array of ids."""
        ids = np.asarray(ids)
        out = (ids >= self.seg_offset) & (ids < self.vocab_size)
        return bool(out) if out.ndim == 0 else out

    def id_to_piece(self, i: int) -> str:
        """The piece of one id, e.g. ``'▁circle'`` (``▁`` is a space)."""
        return self._sp.id_to_piece(self._check_ids([i])[0])

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; raises KeyError for an unknown piece."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"{piece!r} is not a piece of {self.path}")
        return i

    def pieces(self, ids) -> list[str]:
        """The pieces of a list of ids (to look at a tokenization)."""
        return [self._sp.id_to_piece(i) for i in self._check_ids(ids)]

    box_to_loc_tokens = staticmethod(box_to_loc_tokens)
    loc_tokens_to_box = staticmethod(loc_tokens_to_box)

    # -- text <-> ids --------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS. ``<loc>``/``<seg>`` text maps to its id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._sp.encode(text)

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        """Text of ``int[T]`` ids; ``<loc>``/``<seg>`` tokens stay as literal text.

        Stops at the first EOS (``stop_at_eos=False`` decodes past it); PAD, BOS
        and EOS decode to nothing.
        """
        ids = self._check_ids(ids)
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i != self.pad_id])

    def decode_batch(self, ids, stop_at_eos: bool = True) -> list[str]:
        """``decode`` each row of ``int[B, T]`` ids."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"decode_batch() takes int[B, T] ids, got shape {ids.shape}")
        return [self.decode(row, stop_at_eos) for row in ids]

    def _check_ids(self, ids) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise ValueError(f"expected int[T] ids, got shape {arr.shape}; use decode_batch")
        if arr.size == 0:
            return []
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"token id {bad.flat[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        return arr.reshape(-1).tolist()

    # -- prompts and training examples ---------------------------------------

    def _layout(self, prefix: str, suffix: str | None) -> tuple[list[int], list[int]]:
        """``[BOS] + tok(prefix) + tok("\\n")`` and ``tok(suffix)``, tokenized separately."""
        head = [self.bos_id, *self.encode(prefix), *self.newline_ids]
        return head, (self.encode(suffix) if suffix else [])

    def _prompt(self, prefix: str, suffix: str | None) -> tuple[list[int], list[int]]:
        head, tail = self._layout(prefix, suffix)
        return head + tail, [0] * len(head) + [1] * len(tail)

    def encode_prompt(
        self,
        prefix: str,
        *,
        suffix: str | None = None,
        text_len: int | None = None,
        truncate: bool = False,
    ) -> Batch:
        """One inference prompt; see ``encode_prompts``. Arrays are 1-D: ``[T]``.

        T is the prompt's own length, or ``text_len`` when given.
        """
        batch = self.encode_prompts(
            [prefix],
            suffixes=None if suffix is None else [suffix],
            text_len=text_len,
            bucket=None,
            truncate=truncate,
        )
        return {k: v[0] for k, v in batch.items()}

    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        text_len: int | None = None,
        bucket: int | str | None = 16,
        suffixes: Sequence[str | None] | None = None,
        truncate: bool = False,
    ) -> Batch:
        """A ragged batch of inference prompts, right-padded to one length.

        Each row is ``[BOS] + tok(prompt) + tok("\\n")`` (mask_ar 0: the
        bidirectional prefix), then ``tok(suffix)`` if given (mask_ar 1: a forced
        start of the answer), no EOS; big_vision's ``combine_and_keep_eval``.

        Args:
          prompts: B strings (one str is a batch of one).
          text_len: pad every row to exactly this length. A longer prompt raises
            ValueError, or with ``truncate=True`` keeps its first ``text_len``
            tokens and warns.
          bucket: without ``text_len``, pad to the longest prompt rounded up to a
            multiple of ``bucket`` (int), to a power of two (``"pow2"``) or not
            at all (None), so that jitted code sees few distinct shapes.
          suffixes: None, or B strings (None entries mean no suffix).

        Returns:
          dict with ``text`` int32[B, T] (padding 0), ``mask_ar`` int32[B, T]
          (padding 1) and ``mask_input`` bool[B, T] (True on real tokens).
        """
        prompts = _strings(prompts, "prompts")
        if suffixes is None:
            suffixes = [None] * len(prompts)
        suffixes = _strings(suffixes, "suffixes", allow_none=True)
        if len(suffixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(suffixes)} suffixes")
        rows = [self._prompt(p, s) for p, s in zip(prompts, suffixes)]
        lengths = [len(ids) for ids, _ in rows]
        if text_len is None:
            size = _bucket_length(max(lengths), bucket)
        else:
            size = _positive_int(text_len, "text_len")
            self._check_prompt_lengths(lengths, size, truncate)
        return _stack([_fit(ids, ar, size, with_loss=False) for ids, ar in rows])

    @staticmethod
    def _check_prompt_lengths(lengths: list[int], size: int, truncate: bool) -> None:
        long = [i for i, n in enumerate(lengths) if n > size]
        if not long:
            return
        i = long[0]
        if not truncate:
            raise ValueError(
                f"prompts[{i}] is {lengths[i]} tokens long (BOS + prompt + '\\n' + suffix) but "
                f"text_len={size}: pass text_len >= {max(lengths)}, text_len=None to pad to the "
                f"longest prompt, or truncate=True to keep the first {size} tokens"
            )
        warnings.warn(
            f"{len(long)} prompt(s) cut to text_len={size} tokens (prompts[{i}] had "
            f"{lengths[i]}); the cut ones lose their '\\n' separator",
            stacklevel=3,
        )

    def _example(self, prefix: str, suffix: str, size: int, index: int) -> tuple[Batch, int]:
        head, tail = self._layout(prefix, suffix)
        tail.append(self.eos_id)
        if len(head) >= size:
            raise ValueError(
                f"example {index}: BOS + prefix + '\\n' is {len(head)} tokens, which leaves no "
                f"room for the suffix in text_len + 1 = {size} positions: raise text_len or "
                "shorten the prefix"
            )
        ids, mask_ar = head + tail, [0] * len(head) + [1] * len(tail)
        return _fit(ids, mask_ar, size, with_loss=True), len(ids)

    def encode_example(
        self, prefix: str, suffix: str, *, text_len: int, truncate: bool = True
    ) -> Batch:
        """One training example; see ``encode_examples``. Arrays are 1-D: ``[text_len + 1]``."""
        batch = self.encode_examples([prefix], [suffix], text_len=text_len, truncate=truncate)
        return {k: v[0] for k, v in batch.items()}

    def encode_examples(
        self,
        prefixes: Sequence[str],
        suffixes: Sequence[str],
        *,
        text_len: int,
        truncate: bool = True,
    ) -> Batch:
        """Training examples as big_vision's ``combine_and_keep_train(text_len)``.

        Each row is ``[BOS] + tok(prefix) + tok("\\n") + tok(suffix) + [EOS]``
        (prefix, separator and suffix tokenized separately); mask_ar and
        mask_loss are 0 on BOS + prefix + separator and 1 on suffix + EOS.

        Rows have ``text_len + 1`` tokens: the model reads ``text[:, :-1]`` and
        predicts ``text[:, 1:]`` (weights ``mask_loss[:, 1:]``). A longer example
        keeps its first ``text_len + 1`` tokens (its EOS may be cut) with a
        warning, or raises ValueError when ``truncate=False``. An example whose
        BOS + prefix + separator alone fills the row always raises ValueError:
        it would have nothing to learn.

        Returns:
          dict with ``text`` int32[B, text_len + 1] (padding 0), ``mask_ar``
          int32 (padding 1), ``mask_loss`` int32 (padding 0) and ``mask_input``
          bool (True on real tokens).
        """
        prefixes = _strings(prefixes, "prefixes")
        suffixes = _strings(suffixes, "suffixes")
        if len(prefixes) != len(suffixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
        size = _positive_int(text_len, "text_len") + 1
        rows, lengths = zip(
            *(self._example(p, s, size, i) for i, (p, s) in enumerate(zip(prefixes, suffixes)))
        )
        long = [i for i, n in enumerate(lengths) if n > size]
        if long and not truncate:
            i = long[0]
            raise ValueError(
                f"example {i} is {lengths[i]} tokens (BOS + prefix + '\\n' + suffix + EOS) but "
                f"text_len + 1 = {size}: pass text_len >= {max(lengths) - 1} or truncate=True"
            )
        if long:
            warnings.warn(
                f"{len(long)} of {len(lengths)} example(s) cut to text_len + 1 = {size} tokens "
                f"(example {long[0]} had {lengths[long[0]]}); their EOS is lost",
                stacklevel=2,
            )
        return _stack(list(rows))


def find_tokenizer(folder: Path, vocab: int) -> Tokenizer | None:
    """The tokenizer beside a checkpoint (``paligemma_tokenizer.model`` or ``tokenizer.model``
    in ``folder``), else the demo tokenizer when its vocabulary has ``vocab`` ids, else None."""
    for name in ("paligemma_tokenizer.model", "tokenizer.model"):
        if (folder / name).exists():
            return Tokenizer(folder / name)
    demo = asset_dir() / "tokenizer.model"
    if demo.exists() and vocab == Tokenizer(demo).vocab_size:
        return Tokenizer(demo)
    return None
