"""The mask VQ-VAE in JAX (pali_kit.segmentation) against an independent PyTorch reference."""

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pali_kit.detection import parse_detections
from pali_kit.segmentation import (
    crop_and_resize,
    encode_features,
    encode_masks,
    load_vae,
    mask_to_codes,
    paste_binary_mask,
    paste_mask,
    reconstruct_masks,
    soft_mask,
    with_masks,
)

from .conftest import F32_EPS, assert_close_to_scale

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the parity extra is not installed: only the reference tests skip
    torch = F = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch: pip install -e '.[parity]'")

REPO = Path(__file__).resolve().parent.parent

# Ours (XLA convolutions) against the PyTorch reference (oneDNN), or one batch layout against
# another: the same float32 sums in other orders. The longest is a 3x3 conv over 128
# channels, K = 1152 terms: K * eps = 1.4e-4 of the scale in the worst case for one layer,
# sqrt(K) * eps = 4e-6 typically; over the 11 layers of a decoder that is up to ~1e-3 of
# max |value| (the random weights are He-scaled, so activations stay O(1)). A wrong kernel
# flip, padding or stride is off by O(1).
VAE_REL = 1e-3


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_random_vae", REPO / "scripts/make_random_vae.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_random_vae = _script().make_random_vae


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return make_random_vae(tmp_path_factory.mktemp("vae") / "vae-oid.npz", codebook_dim=512)


@pytest.fixture(scope="module")
def vae(vae_path):
    return load_vae(vae_path)


@pytest.fixture(scope="module")
def codes():
    return np.random.default_rng(1).integers(0, 128, (3, 16))


# ----------------------------------------------------------------------------- the PyTorch reference


class TorchVAE(torch.nn.Module if torch else object):
    """The VQ-VAE written with torch.nn layers, loading the npz with PyTorch names as they are."""

    def __init__(self, arrays):
        super().__init__()
        d = arrays["_vq_vae._embedding"].shape[1]
        self.codebook = torch.from_numpy(arrays["_vq_vae._embedding"])
        self.dec_in = torch.nn.Conv2d(d, 128, 1)
        self.dec_res = torch.nn.ModuleList([self._resblock() for _ in range(2)])
        chans = [128, 128, 64, 32, 16]
        self.ups = torch.nn.ModuleList(
            [
                torch.nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1)
                for i in range(4)
            ]
        )
        self.dec_out = torch.nn.Conv2d(16, 1, 1)
        k = arrays["encoder.0.weight"].shape[-1]
        enc_chans = [1, 16, 32, 64, 128]
        self.downs = torch.nn.ModuleList(
            [torch.nn.Conv2d(enc_chans[i], enc_chans[i + 1], k, stride=2) for i in range(4)]
        )
        self.enc_res = torch.nn.ModuleList([self._resblock() for _ in range(2)])
        self.enc_out = torch.nn.Conv2d(128, d, 1)
        names = {
            "dec_in": "decoder.0", "dec_out": "decoder.12", "enc_out": "encoder.10",
            **{f"dec_res.{i}.{j}": f"decoder.{i + 2}.net.{j}" for i in range(2) for j in (0, 2, 4)},
            **{f"enc_res.{i}.{j}": f"encoder.{i + 8}.net.{j}" for i in range(2) for j in (0, 2, 4)},
            **{f"ups.{i}": f"decoder.{4 + 2 * i}" for i in range(4)},
            **{f"downs.{i}": f"encoder.{2 * i}" for i in range(4)},
        }  # fmt: skip
        state = {
            f"{ours}.{kind}": torch.from_numpy(arrays[f"{theirs}.{kind}"])
            for ours, theirs in names.items()
            for kind in ("weight", "bias")
        }
        self.load_state_dict(state, strict=True)

    @staticmethod
    def _resblock():
        return torch.nn.Sequential(
            torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(128, 128, 1),
        )  # fmt: skip

    def decode(self, indices):
        x = self.codebook[torch.from_numpy(indices)]  # [B, 16, D]
        x = x.reshape(indices.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
        x = F.relu(self.dec_in(x))
        for block in self.dec_res:
            x = x + block(x)
        for up in self.ups:
            x = F.relu(up(x))
        return self.dec_out(x)[:, 0]

    def encode(self, masks):
        x = 2.0 * (torch.from_numpy(masks)[:, None] - 0.5)
        for down in self.downs:
            x = F.relu(down(_tf_same_pad(x, down.kernel_size[0], 2)))
        for block in self.enc_res:
            x = x + block(x)
        features = self.enc_out(x)  # [B, D, 4, 4]
        flat = features.permute(0, 2, 3, 1).reshape(-1, self.codebook.shape[1])
        codes = torch.cdist(flat, self.codebook).argmin(dim=1).reshape(-1, 16)
        return features.permute(0, 2, 3, 1), codes


def _tf_same_pad(x, k, s):
    """TensorFlow "SAME" padding (big_vision's encoder): the odd pixel goes after."""
    size = x.shape[-1]
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


def _arrays(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def assert_close_relative(ours, reference):
    assert_close_to_scale(ours, reference, VAE_REL)


# ----------------------------------------------------------------------------- decoder and encoder


@needs_torch
def test_decoder_matches_pytorch_reference(vae, vae_path, codes):
    with torch.no_grad():
        reference = TorchVAE(_arrays(vae_path)).decode(codes).numpy()
    ours = reconstruct_masks(vae, codes)
    assert ours.shape == (3, 64, 64) and ours.dtype == np.float32
    assert_close_relative(ours, reference)


@pytest.fixture(scope="module")
def masks64():
    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 30) ** 2 + (xx - 36) ** 2 < 20**2).astype(np.float32)
    rng = np.random.default_rng(2)
    return np.stack([disk, (rng.random((64, 64)) > 0.5).astype(np.float32), np.zeros((64, 64))])


@needs_torch
def test_encoder_matches_pytorch_reference(vae, vae_path, masks64):
    with torch.no_grad():
        features, codes = TorchVAE(_arrays(vae_path)).encode(masks64.astype(np.float32))
    ours = np.asarray(encode_features(vae.params, masks64))
    assert ours.shape == (3, 4, 4, 512)
    assert_close_relative(ours, features.numpy())
    np.testing.assert_array_equal(encode_masks(vae, masks64), codes.numpy())


@needs_torch
def test_encoder_with_odd_kernel_uses_tf_same_padding(tmp_path, masks64):
    path = make_random_vae(tmp_path / "k3.npz", codebook_dim=64, encoder_kernel=3)
    with torch.no_grad():
        features, _ = TorchVAE(_arrays(path)).encode(masks64.astype(np.float32))
    assert_close_relative(
        np.asarray(encode_features(load_vae(path).params, masks64)), features.numpy()
    )


@needs_torch
@pytest.mark.parametrize("dim", [64, 512])
def test_codebook_dim_is_read_from_the_file(tmp_path, dim, codes):
    path = make_random_vae(tmp_path / f"vae{dim}.npz", codebook_dim=dim, seed=dim)
    vae = load_vae(path)
    assert vae.codebook_dim == dim and vae.num_codes == 128
    with torch.no_grad():
        reference = TorchVAE(_arrays(path)).decode(codes).numpy()
    assert_close_relative(reconstruct_masks(vae, codes), reference)
    assert encode_masks(vae, np.zeros((2, 64, 64))).shape == (2, 16)


def test_single_code_list_gives_single_mask(vae, codes):
    single = reconstruct_masks(vae, codes[0])
    assert single.shape == (64, 64)
    assert_close_relative(single, reconstruct_masks(vae, codes)[0])  # batch of 1 vs of 3


def test_codes_out_of_range_raise(vae):
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        reconstruct_masks(vae, np.full((1, 16), 128))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        reconstruct_masks(vae, np.zeros((1, 15), int))


# ----------------------------------------------------------------------------- loading


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_vae(tmp_path / "nope.npz")


def test_not_an_npz_file_is_a_clear_error(tmp_path):
    path = tmp_path / "vae.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_vae(path)


def test_pickled_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"_vq_vae._embedding": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_vae(path)


def test_wrong_file_lists_missing_parameters(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match="vae-oid.npz"):
        load_vae(path)


def test_demo_vae_comes_from_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PALI_KIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PALI_KIT_DATA"):
        load_vae("demo")
    make_random_vae(tmp_path / "vae.npz", codebook_dim=64)
    assert load_vae("demo").codebook_dim == 64


def test_decoder_only_file_loads_but_cannot_encode(vae_path):
    arrays = {k: v for k, v in _arrays(vae_path).items() if not k.startswith("encoder.")}
    vae = load_vae(arrays)
    assert reconstruct_masks(vae, np.zeros((1, 16), int)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="no encoder"):
        encode_masks(vae, np.zeros((64, 64)))


# ----------------------------------------------------------------------------- placement


def test_paste_mask_resizes_into_the_box_with_pil_bilinear():
    m64 = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    canvas = paste_mask(m64, (10.4, 20.6, 50, 40), width=64, height=48)
    expected = np.asarray(PIL.Image.fromarray(m64, "F").resize((40, 19), PIL.Image.BILINEAR))
    np.testing.assert_array_equal(canvas[21:40, 10:50], expected)
    canvas[21:40, 10:50] = 0
    assert not canvas.any()


def test_paste_mask_clips_a_box_partly_outside_the_image():
    canvas = paste_mask(np.ones((64, 64), np.float32), (-10, -5, 30, 30), width=64, height=48)
    assert canvas.sum() == 30 * 30 and canvas[:30, :30].all()


def test_paste_mask_of_an_empty_box_is_all_zero():
    assert not paste_mask(np.ones((64, 64)), (5, 5, 5, 9), 16, 16).any()


def test_binary_mask_is_decoder_output_above_zero():
    m64 = np.where(np.arange(64)[None, :] < 32, -0.5, 0.5).repeat(64, 0).astype(np.float32)
    binary = paste_binary_mask(m64, (0, 0, 64, 64), 64, 64)
    assert binary[:, 40:].all() and not binary[:, :24].any()


def test_soft_mask_maps_minus_one_to_zero_and_one_to_one():
    np.testing.assert_array_equal(
        soft_mask(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])), [0, 0, 0.5, 1, 1]
    )


def test_with_masks_fills_masks_inside_the_box_only(vae, codes):
    codes_text = "".join(f"<seg{c:03d}>" for c in codes[0])
    text = f"<loc0256><loc0128><loc0768><loc0512>{codes_text} cat ; <loc0000><loc0000><loc0100><loc0100> dog"
    cat, dog = with_masks(parse_detections(text, 200, 100), vae, 200, 100)
    assert dog.mask is None and dog.binary_mask is None
    assert cat.mask.shape == (100, 200) and cat.mask.dtype == np.float32
    assert cat.mask.min() >= 0 and cat.mask.max() <= 1
    assert cat.box == (25.0, 25.0, 100.0, 75.0)
    outside = np.ones((100, 200), bool)
    outside[25:75, 25:100] = False
    assert not cat.mask[outside].any() and not cat.binary_mask[outside].any()
    expected = paste_binary_mask(reconstruct_masks(vae, codes[0]), cat.box, 200, 100)
    np.testing.assert_array_equal(cat.binary_mask, expected)


# ----------------------------------------------------------------------------- encoding targets


def test_crop_and_resize_of_a_filled_box_is_all_ones():
    mask = np.zeros((100, 120), bool)
    mask[20:60, 30:90] = True
    # Resize weights that sum to one, over a few taps per axis: 1 up to a few float32
    # roundings; rtol = 8 eps (the default 1e-7 is below one rounding).
    np.testing.assert_allclose(crop_and_resize(mask, (30, 20, 90, 60)), 1.0, rtol=8 * F32_EPS)


def test_crop_and_resize_keeps_the_left_half():
    mask = np.zeros((128, 128), np.uint8)
    mask[:, :64] = 255
    m64 = crop_and_resize(mask, (0, 0, 128, 128))
    # Away from the edge the resize averages only ones (or only zeros): exact up to a few
    # float32 roundings of values <= 1, so atol = 8 eps.
    np.testing.assert_allclose(m64[:, :31], 1.0, atol=8 * F32_EPS)
    np.testing.assert_allclose(m64[:, 33:], 0.0, atol=8 * F32_EPS)


def test_mask_to_codes_gives_16_codes_of_the_encoded_crop(vae):
    mask = np.zeros((100, 120), bool)
    mask[20:60, 30:90] = True
    codes = mask_to_codes(vae, mask, (30, 20, 90, 60))
    assert len(codes) == 16 and all(0 <= c < 128 for c in codes)
    assert codes == tuple(encode_masks(vae, np.ones((64, 64))))


def test_mask_to_codes_rejects_an_empty_box(vae):
    with pytest.raises(ValueError, match="empty"):
        mask_to_codes(vae, np.ones((10, 10), bool), (5, 5, 5, 8))
