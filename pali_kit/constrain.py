"""Constrained decoding for ``detect`` / ``segment``: a token automaton applied as a logit mask.

    from pali_kit import constrain, decode
    c = constrain.build(tokenizer, [["circle", "square"]], task="detect")
    tokens, logp = decode.generate_tokens(..., constraint=c)   # every answer parses

The automaton accepts exactly the answers the parser understands, naming only
the requested labels (``detect``; ``segment`` adds 16 ``<seg>`` after the box)::

    answer := EOS | object (" ; " object)* EOS
    object := <loc> <loc> <loc> <loc> [<seg> x 16] " " label

It works on tokens: each label is tokenized once, in context (``<loc..> label ;
<loc..>`` and ``<loc..> label`` + EOS), and those token sequences form a trie.
The alphabet is compact: symbol 0 is "any ``<loc>``", symbol 1 "any ``<seg>``",
the others are single token ids (EOS, label and separator pieces). Tables:

    alphabet   int32[A]     token id of each symbol (-1 for the two classes and padding)
    next       int32[S, A]  next state, -1 where the symbol is not allowed
    cont       bool[S, A]   taking this symbol commits to one more object
    scalars    int32[6]     loc offset, seg offset, max extra objects, tokens needed
                            to finish an object after a ``cont`` step, max_new_tokens, DONE

State 0 is DONE (only EOS). Each row carries ``int32[2]``: its state and how
many ``cont`` steps it took. A ``cont`` symbol is masked once a row has
``max_objects`` objects or when the tokens left could not finish another
object, so an answer always ends with a complete object and EOS.

S and A are padded to powers of two, so another label set of similar token
length reuses the compiled sampler (``decode.compile_count()`` does not move).
Several label sets (one per image) share one table with a start state per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .tokenizer import Tokenizer
from .vocab import NUM_LOC, NUM_SEG

LOC, SEG = 0, 1  # the two class symbols
DONE = 0  # the state after EOS
TASKS = ("detect", "segment")
_NO_LIMIT = 1 << 20


@dataclasses.dataclass(frozen=True)
class Constraint:
    """An automaton's tables (numpy, padded to buckets) and each row's start state.

    Attributes:
      alphabet: int32[A]; next: int32[S, A]; cont: bool[S, A] (see the module doc).
      scalars: int32[6]: loc offset, seg offset, max extra objects, tail length,
        max_new_tokens, DONE.
      start: int32[B] the start state of each row.
      labels: the requested labels of each row (for messages and parsing).
      task: "detect" or "segment".
    """

    alphabet: np.ndarray
    next: np.ndarray
    cont: np.ndarray
    scalars: np.ndarray
    start: np.ndarray
    labels: tuple[tuple[str, ...], ...]
    task: str
    sep_len: int  # the longest label + separator token sequence

    @property
    def tail(self) -> int:
        """Most tokens an object needs after its separator starts (incl. the final EOS)."""
        return int(self.scalars[3])

    @property
    def min_new_tokens(self) -> int:
        """The fewest new tokens that always fit one complete object and EOS."""
        return self.tail - self.sep_len

    def repeat(self, n: int) -> Constraint:
        """Every row repeated n times (row i -> rows i*n .. i*n+n-1), as ``best_of`` does."""
        labels = tuple(s for s in self.labels for _ in range(n))
        return dataclasses.replace(self, start=np.repeat(self.start, n), labels=labels)

    def tables(self, max_new_tokens: int):
        """Device tables for one decode call: (alphabet, next, cont, scalars)."""
        scalars = self.scalars.copy()
        scalars[4] = max_new_tokens
        return (jnp.asarray(self.alphabet), jnp.asarray(self.next), jnp.asarray(self.cont),
                jnp.asarray(scalars))  # fmt: skip

    def initial_state(self, rows: Sequence[int] | None = None, pad_to: int | None = None,
                      batch: int | None = None):  # fmt: skip
        """int32[B', 2] row states (start state, 0 objects); ``rows`` picks/repeats rows,
        ``pad_to`` repeats the last row (like the decoder's batch padding); ``batch``:
        the number of prompts, which must equal the number of rows."""
        if batch is not None and batch != len(self.start):
            raise ValueError(
                f"the constraint has {len(self.start)} rows (label sets) but the batch has "
                f"{batch} prompts: build it with one label set per prompt"
            )
        start = self.start if rows is None else self.start[np.asarray(rows)]
        if pad_to is not None and pad_to > len(start):
            start = np.concatenate([start, np.repeat(start[-1:], pad_to - len(start))])
        return jnp.asarray(np.stack([start, np.zeros_like(start)], axis=1), jnp.int32)


# ----------------------------------------------------------------------------- building


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def label_sequences(tokenizer: Tokenizer, label: str, task: str = "detect"):
    """Token ids of ``label`` as the model writes it: (ending with EOS, ending with the separator).

    Tokenized in context, e.g. ``"<loc0000>x4 cat ; <loc0000>"``, and cut at the
    loc tokens, so the pieces are the ones training targets contain.
    """
    loc = tokenizer.loc_id(0)
    box = "<loc0000>" * 4 + ("<seg000>" * 16 if task == "segment" else "")
    n_box = 4 + (16 if task == "segment" else 0)
    more = tokenizer.encode(f"{box} {label} ; {box}")
    last = tokenizer.encode(f"{box} {label}")
    if more[:n_box] != tokenizer.encode(box) or more[-n_box] != loc or last[:n_box] != more[:n_box]:
        raise ValueError(f"label {label!r} does not tokenize cleanly between <loc> tokens")
    return tuple(last[n_box:]) + (tokenizer.eos_id,), tuple(more[n_box:-n_box])


def check_labels(labels, name: str = "labels") -> list[str]:
    """A list of label strings: stripped, whitespace collapsed, no ';' or newline, no duplicates."""
    if isinstance(labels, str):
        labels = [labels]
    try:
        labels = list(labels)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings, got {type(labels).__name__}") from None
    if not labels:
        raise ValueError(f"{name} is empty: give at least one label, e.g. ['cat']")
    out = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(label).__name__}: {label!r}")
        clean = " ".join(label.split())
        if not clean or ";" in clean:
            raise ValueError(
                f"{name}[{i}] = {label!r}: a label must be non-empty text without ';' "
                "(';' separates objects in PaliGemma answers)"
            )
        if clean not in out:
            out.append(clean)
    return out


def build(
    tokenizer: Tokenizer,
    label_sets: Sequence[Sequence[str]],
    *,
    task: str = "detect",
    max_objects: int | None = None,
) -> Constraint:
    """The automaton for one label set per row (rows with equal sets share states).

    Args:
      tokenizer: the model's tokenizer (``<loc>``/``<seg>`` ids come from it).
      label_sets: one list of labels per row (checked with ``check_labels``).
      task: "detect" or "segment" (16 ``<seg>`` after each box).
      max_objects: at most this many objects per answer (None: no limit but
        the token budget).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if max_objects is not None and (not isinstance(max_objects, int) or max_objects < 1):
        raise ValueError(f"max_objects must be a positive int or None, got {max_objects!r}")
    n_seg = 16 if task == "segment" else 0
    sets = [tuple(check_labels(s, f"labels[{i}]")) for i, s in enumerate(label_sets)]
    symbols = {tokenizer.eos_id: 2}  # token id -> symbol
    edges: list[dict[int, tuple[int, bool]]] = [{2: (DONE, False)}]  # DONE: EOS loops
    start_of: dict[tuple[str, ...], int] = {}
    longest_eos = longest_sep = 0

    def new_state() -> int:
        edges.append({})
        return len(edges) - 1

    def sym(token: int) -> int:
        return symbols.setdefault(int(token), len(symbols) + 2)

    for labels in dict.fromkeys(sets):
        start, after_sep = new_state(), new_state()
        chain = [new_state() for _ in range(3 + n_seg)]  # after 1..3 locs, then k segs
        root = new_state()  # after the box: the label
        edges[start][LOC] = (chain[0], False)
        edges[start][sym(tokenizer.eos_id)] = (DONE, False)
        edges[after_sep][LOC] = (chain[0], False)
        for a, b in zip(chain[:3], chain[1:3]):
            edges[a][LOC] = (b, False)
        if n_seg:
            edges[chain[2]][LOC] = (chain[3], False)
            for a, b in zip(chain[3:], chain[4:] + [root]):
                edges[a][SEG] = (b, False)
        else:
            edges[chain[2]][LOC] = (root, False)
        # The label trie: every label once ending in EOS, once in the separator.
        kinds: dict[int, set[str]] = {}  # trie node -> which endings lie below it
        for label in labels:
            seq_eos, seq_sep = label_sequences(tokenizer, label, task)
            longest_eos, longest_sep = (
                max(longest_eos, len(seq_eos)),
                max(longest_sep, len(seq_sep)),
            )
            for seq, end, kind in ((seq_eos, DONE, "eos"), (seq_sep, after_sep, "sep")):
                node = root
                for i, token in enumerate(seq):
                    kinds.setdefault(node, set()).add(kind)
                    s = sym(token)
                    target = edges[node].get(s, (None, False))[0]
                    if i == len(seq) - 1:
                        if target is not None and target != end:
                            raise ValueError(f"label {label!r} clashes with another label's tokens")
                        edges[node][s] = (end, False)
                    else:
                        if target in (DONE, after_sep):
                            raise ValueError(f"label {label!r} clashes with another label's tokens")
                        if target is None:
                            target = new_state()
                            edges[node][s] = (target, False)
                        node = target
        # cont: leaving a node that can still end in EOS for one that can only continue.
        for node, kind in kinds.items():
            if "eos" not in kind:
                continue
            for s, (target, _) in list(edges[node].items()):
                if target == after_sep or (target in kinds and kinds[target] == {"sep"}):
                    edges[node][s] = (target, True)
        start_of[labels] = start

    n_states, n_symbols = _bucket(len(edges), 64), _bucket(len(symbols) + 2, 16)
    alphabet = np.full(n_symbols, -1, np.int32)
    for token, s in symbols.items():
        alphabet[s] = token
    nxt = np.full((n_states, n_symbols), -1, np.int32)
    cont = np.zeros((n_states, n_symbols), bool)
    for state, out in enumerate(edges):
        for s, (target, is_cont) in out.items():
            nxt[state, s], cont[state, s] = target, is_cont
    max_cont = _NO_LIMIT if max_objects is None else max_objects - 1
    tail = longest_sep + 4 + n_seg + longest_eos  # after a cont step, at most
    scalars = np.array(
        [tokenizer.loc_offset, tokenizer.seg_offset, max_cont, tail, 0, DONE], np.int32
    )
    start = np.array([start_of[s] for s in sets], np.int32)
    return Constraint(alphabet, nxt, cont, scalars, start, tuple(sets), task, longest_sep)


# ----------------------------------------------------------------------------- in the decode loop


def _symbols(tables, tokens):
    """int32[B] token ids -> int32[B] symbols (-1 when the token is not in the alphabet)."""
    alphabet, _, _, scalars = tables
    is_loc = (tokens >= scalars[0]) & (tokens < scalars[0] + NUM_LOC)
    is_seg = (tokens >= scalars[1]) & (tokens < scalars[1] + NUM_SEG)
    hit = alphabet[None, :] == tokens[:, None]  # [B, A]
    word = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), -1)
    return jnp.where(is_loc, LOC, jnp.where(is_seg, SEG, word)).astype(jnp.int32)


def _allowed_symbols(tables, state, t):
    """bool[B, A]: the symbols each row may take at step ``t`` (int32[])."""
    _, nxt, cont, scalars = tables
    s, n_cont = state[:, 0], state[:, 1]
    allowed = nxt[s] >= 0
    room = scalars[4] - t - 1 >= scalars[3]  # tokens left after this one can finish an object
    cont_ok = (n_cont < scalars[2]) & room
    return allowed & ~(cont[s] & ~cont_ok[:, None])


def allowed_tokens(tables, state, t, vocab_size: int):
    """bool[B, V] logit mask for row states int32[B, 2] at step t (jit-friendly)."""
    alphabet, _, _, scalars = tables
    allowed = _allowed_symbols(tables, state, t)
    v = jnp.arange(vocab_size)
    is_loc = (v >= scalars[0]) & (v < scalars[0] + NUM_LOC)
    is_seg = (v >= scalars[1]) & (v < scalars[1] + NUM_SEG)
    mask = (allowed[:, LOC, None] & is_loc) | (allowed[:, SEG, None] & is_seg)
    idx = jnp.where(alphabet >= 0, alphabet, vocab_size)  # classes/padding are dropped
    rows = jnp.arange(state.shape[0])[:, None]
    words = jnp.zeros(mask.shape, bool).at[rows, idx[None, :]].set(allowed, mode="drop")
    return mask | words


def advance(tables, state, tokens):
    """Row states int32[B, 2] after taking int32[B] tokens; unknown tokens (PAD) keep the state."""
    _, nxt, cont, _ = tables
    s = state[:, 0]
    sym = _symbols(tables, tokens)
    safe = jnp.maximum(sym, 0)
    target = jnp.take_along_axis(nxt[s], safe[:, None], axis=1)[:, 0]
    took = (sym >= 0) & (target >= 0)
    step_cont = jnp.take_along_axis(cont[s], safe[:, None], axis=1)[:, 0] & took
    return jnp.stack([jnp.where(took, target, s), state[:, 1] + step_cont], axis=1)


def reorder(state, parents):
    """Beam search: every beam continues from its parent's state."""
    return jnp.take(state, parents, axis=0)


# ----------------------------------------------------------------------------- host helpers


def accepts(c: Constraint, row: int, tokens: Sequence[int], max_new_tokens: int = 1 << 20):
    """Does row ``row``'s automaton accept ``tokens`` (read up to the first EOS)?

    True when every token is allowed (with the same ``max_objects`` and
    token-budget rules as in the decode loop) and the answer ends with EOS.
    Plain numpy, written separately from the jitted functions above, so tests
    can check one against the other.
    """
    loc0, seg0, max_cont, tail = (int(v) for v in c.scalars[:4])
    eos = int(c.alphabet[2])
    state, conts = int(c.start[row]), 0
    for t, token in enumerate(int(x) for x in tokens):
        if loc0 <= token < loc0 + NUM_LOC:
            sym = LOC
        elif seg0 <= token < seg0 + NUM_SEG:
            sym = SEG
        else:
            hits = np.flatnonzero(c.alphabet == token)
            sym = int(hits[0]) if hits.size else -1
        if sym < 0 or c.next[state, sym] < 0:
            return False
        if c.cont[state, sym]:
            if conts >= max_cont or max_new_tokens - t - 1 < tail:
                return False
            conts += 1
        state = int(c.next[state, sym])
        if token == eos:
            return state == DONE
    return False
