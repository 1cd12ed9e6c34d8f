"""Write a mask VQ-VAE .npz with random weights in the exact key layout of vae-oid.npz.

Builds: no file in ``data/`` by itself (the path is an argument); tests call
``random_vae_arrays`` and ``train_demo_vae.py`` starts ``data/vae.npz`` from it.
Takes about 1 s. Deterministic: ``--seed`` (default 0) drives every array; the
same seed gives the same bytes.

    python scripts/make_random_vae.py data/vae.npz --codebook-dim 512 --seed 0

Tests and the docs use it where the real ``vae-oid.npz`` (spec 7.3/7.4) is not
available. Keys and layouts are PyTorch's: conv weights (out, in, kh, kw),
transposed-conv weights (in, out, kh, kw), biases (out,), codebook (128, D).

Encoder (not listed with shapes in the spec; channels mirror the decoder):
``encoder.{0,2,4,6}`` 4x4 stride-2 convs 1->16->32->64->128, ``encoder.{8,9}.net.{0,2,4}``
ResBlocks (3x3, 3x3, 1x1, 128->128) and ``encoder.10`` a 1x1 conv 128->D.
Decoder: exactly the table of spec 7.3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pali_kit.atomic import atomic_write

HIDDEN = 128
UP_CHANNELS = (128, 128, 64, 32, 16)  # decoder ConvTranspose in/out chain
DOWN_CHANNELS = (1, 16, 32, 64, 128)  # encoder stride-2 conv chain


def vae_shapes(codebook_dim: int = 512, encoder_kernel: int = 4) -> dict[str, tuple[int, ...]]:
    """Every key of vae-oid.npz -> its shape, for a codebook of width ``codebook_dim``."""
    shapes: dict[str, tuple[int, ...]] = {"_vq_vae._embedding": (128, codebook_dim)}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def resblock(name):
        conv(f"{name}.0", HIDDEN, HIDDEN, 3)
        conv(f"{name}.2", HIDDEN, HIDDEN, 3)
        conv(f"{name}.4", HIDDEN, HIDDEN, 1)

    for i in range(4):
        conv(f"encoder.{2 * i}", DOWN_CHANNELS[i + 1], DOWN_CHANNELS[i], encoder_kernel)
    resblock("encoder.8.net")
    resblock("encoder.9.net")
    conv("encoder.10", codebook_dim, HIDDEN, 1)

    conv("decoder.0", HIDDEN, codebook_dim, 1)
    resblock("decoder.2.net")
    resblock("decoder.3.net")
    for i, layer in enumerate((4, 6, 8, 10)):
        c_in, c_out = UP_CHANNELS[i], UP_CHANNELS[i + 1]
        shapes[f"decoder.{layer}.weight"] = (c_in, c_out, 4, 4)  # transposed: (in, out, kh, kw)
        shapes[f"decoder.{layer}.bias"] = (c_out,)
    conv("decoder.12", 1, 16, 1)
    return shapes


def random_vae_arrays(
    codebook_dim: int = 512, seed: int = 0, encoder_kernel: int = 4
) -> dict[str, np.ndarray]:
    """Random float32 weights (He-scaled, so activations stay O(1)) for every key."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in vae_shapes(codebook_dim, encoder_kernel).items():
        if name.endswith(".bias"):
            arrays[name] = rng.normal(0.0, 0.05, shape)
        elif name == "_vq_vae._embedding":
            arrays[name] = rng.normal(0.0, 1.0, shape)
        else:
            transposed = name.startswith("decoder.") and len(shape) == 4 and shape[2] == 4
            fan_in = (shape[0] if transposed else shape[1]) * shape[2] * shape[3]
            arrays[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def make_random_vae(
    path: str | Path, *, codebook_dim: int = 512, seed: int = 0, encoder_kernel: int = 4
) -> Path:
    """Write the random VAE to ``path`` (an .npz) and return the path."""
    path = Path(path)
    if path.suffix != ".npz":  # as np.savez names it
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **random_vae_arrays(codebook_dim, seed, encoder_kernel))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output .npz")
    parser.add_argument("--codebook-dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-kernel", type=int, default=4)
    args = parser.parse_args(argv)
    out = make_random_vae(
        args.path,
        codebook_dim=args.codebook_dim,
        seed=args.seed,
        encoder_kernel=args.encoder_kernel,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
