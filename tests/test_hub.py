"""Specification of pali_kit.hub: registry name -> local .npz, offline-testable.

Nothing here touches the network: a fixture makes every socket connection fail,
and downloads are either served from a pre-populated kagglehub cache or from a
fake ``kagglehub.model_download``.
"""

from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import requests

from pali_kit import hub
from pali_kit.checkpoints import flatten, load_params, save_params
from pali_kit.configs import CHECKPOINTS, GemmaConfig, PaliGemmaConfig, VisionConfig
from pali_kit.model import param_shapes

kagglehub = pytest.importorskip("kagglehub")
kagglehub_config = pytest.importorskip("kagglehub.config")
KaggleApiHTTPError = pytest.importorskip("kagglehub.exceptions").KaggleApiHTTPError

NAME = "paligemma2-3b-pt-224"
INFO = CHECKPOINTS[NAME]
HANDLE = INFO.kaggle_handle  # google/paligemma-2/jax/paligemma2-3b-pt-224
SECRET = "0123456789abcdef-not-a-real-key"

TINY = PaliGemmaConfig(
    vision=VisionConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=8),
    llm=GemmaConfig(variant="custom", width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1,
                    head_dim=8, vocab_size=64, post_norms=True, attn_logits_softcap=50.0),
)  # fmt: skip


@pytest.fixture(autouse=True)
def offline_and_clean(monkeypatch, tmp_path):
    """No network, no real credentials, no Kaggle/Colab, a private cache and home."""

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "home" / ".kaggle"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "KAGGLE_INPUT", tmp_path / "kaggle-input")
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not in Colab: import fails
    monkeypatch.setattr(kagglehub_config, "_kaggle_credentials", None)


@pytest.fixture(scope="module")
def tiny_params():
    """Random float32 params of TINY in the official tree (the layout is what matters)."""
    rng = np.random.default_rng(0)
    flat = flatten(param_shapes(TINY))
    return {key: rng.standard_normal(s.shape).astype(np.float32) for key, s in flat.items()}


def put_in_cache(params, cache: Path, version: int = 1) -> Path:
    """Lay a checkpoint out exactly as kagglehub leaves a finished download."""
    path = cache / "models" / HANDLE / str(version) / INFO.kaggle_file
    save_params(params, path)
    marker = cache / "models" / HANDLE / ".complete" / str(version) / f"{INFO.kaggle_file}.complete"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return path


def fake_colab(monkeypatch, secrets: dict):
    class SecretNotFoundError(Exception):
        pass

    def get(name):
        if name not in secrets:
            raise SecretNotFoundError(name)
        return secrets[name]

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def fake_download(monkeypatch, tiny_params, calls: list):
    """Stand-in for kagglehub.model_download that 'downloads' into the cache."""

    def model_download(handle, path=None, force_download=False):
        calls.append((handle, path, kagglehub_config.get_kaggle_credentials()))
        return str(put_in_cache(tiny_params, hub.cache_folder(), int(handle.rsplit("/", 1)[1])
                                if handle.count("/") == 4 else 1))  # fmt: skip

    monkeypatch.setattr(kagglehub, "model_download", model_download)


def http_error(status: int) -> KaggleApiHTTPError:
    response = requests.Response()
    response.status_code = status
    return KaggleApiHTTPError(f"{status} Client Error", response=response)


# ------------------------------------------------------------------ the cache


def test_cached_checkpoint_is_found_without_network_or_credentials(tiny_params, tmp_path):
    expected = put_in_cache(tiny_params, tmp_path / "cache")
    assert hub.download(NAME) == expected


def test_cached_checkpoint_loads_to_the_same_params(tiny_params, tmp_path):
    put_in_cache(tiny_params, tmp_path / "cache")
    loaded = flatten(load_params(hub.download(NAME)))
    for key, value in flatten(tiny_params).items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))


def test_cache_dir_argument_overrides_the_environment(tiny_params, tmp_path):
    expected = put_in_cache(tiny_params, tmp_path / "elsewhere")
    assert hub.download(NAME, cache_dir=tmp_path / "elsewhere") == expected
    assert hub.cache_folder() == tmp_path / "cache"  # restored afterwards


def test_our_cache_layout_is_kagglehubs(tiny_params, tmp_path):
    """kagglehub itself serves the pre-populated file offline for a versioned handle."""
    expected = put_in_cache(tiny_params, tmp_path / "cache")
    assert Path(kagglehub.model_download(f"{HANDLE}/1", path=INFO.kaggle_file)) == expected


def test_newest_cached_version_wins(tiny_params, tmp_path):
    put_in_cache(tiny_params, tmp_path / "cache", version=1)
    newest = put_in_cache(tiny_params, tmp_path / "cache", version=3)
    assert hub.download(NAME) == newest
    assert hub.download(NAME, version=1).parent.name == "1"


def test_unfinished_download_in_cache_is_not_used(tiny_params, tmp_path):
    path = put_in_cache(tiny_params, tmp_path / "cache")
    (path.parent.parent / ".complete" / "1" / f"{INFO.kaggle_file}.complete").unlink()
    with pytest.raises(hub.KaggleAuthError):
        hub.download(NAME)


# ------------------------------------------------------------------ Kaggle inputs


def test_attached_kaggle_input_is_used_without_credentials(tiny_params, tmp_path):
    mounted = tmp_path / "kaggle-input" / "paligemma-2" / "jax" / NAME / "1" / INFO.kaggle_file
    save_params(tiny_params, mounted)
    assert hub.download(NAME) == mounted


def test_inside_kaggle_kagglehub_is_called_without_credentials(monkeypatch, tiny_params):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    calls = []
    fake_download(monkeypatch, tiny_params, calls)
    assert hub.download(NAME).name == INFO.kaggle_file
    assert calls[0][:2] == (HANDLE, INFO.kaggle_file)


# ------------------------------------------------------------------ credentials


def test_missing_credentials_say_what_to_do(tmp_path):
    with pytest.raises(hub.KaggleAuthError) as err:
        hub.download(NAME)
    message = str(err.value)
    for needle in ("https://www.kaggle.com/models/google/paligemma-2", "KAGGLE_USERNAME",
                   "KAGGLE_KEY", "kaggle.json", "Colab", "licence"):  # fmt: skip
        assert needle in message


def test_colab_secrets_are_handed_to_kagglehub(monkeypatch, tiny_params):
    fake_colab(monkeypatch, {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": SECRET})
    calls = []
    fake_download(monkeypatch, tiny_params, calls)
    path = hub.download(NAME)
    assert path.is_file()
    handle, file, creds = calls[0]
    assert (handle, file) == (HANDLE, INFO.kaggle_file)
    assert (creds.username, creds.key) == ("someone", SECRET)


def test_colab_without_the_secrets_falls_back_to_environment(monkeypatch, tiny_params):
    fake_colab(monkeypatch, {})  # every userdata.get raises, as Colab does
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert hub.find_credentials() == "the KAGGLE_* environment variables"


def test_colab_secrets_come_before_environment(monkeypatch):
    fake_colab(monkeypatch, {"KAGGLE_USERNAME": "colab-user", "KAGGLE_KEY": SECRET})
    monkeypatch.setenv("KAGGLE_USERNAME", "env-user")
    monkeypatch.setenv("KAGGLE_KEY", "other")
    assert hub.find_credentials() == "Colab secrets"


def test_environment_comes_before_kaggle_json(monkeypatch, tmp_path):
    write_kaggle_json(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert hub.find_credentials() == "the KAGGLE_* environment variables"


def test_kaggle_api_token_variable_counts(monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    assert hub.find_credentials() == "the KAGGLE_* environment variables"


def write_kaggle_json(tmp_path, content=None) -> Path:
    path = tmp_path / "home" / ".kaggle" / "kaggle.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        content if content is not None else json.dumps({"username": "u", "key": SECRET})
    )
    return path


def test_kaggle_json_is_found(tmp_path):
    path = write_kaggle_json(tmp_path)
    assert hub.find_credentials() == str(path)


def test_broken_kaggle_json_is_reported_without_its_content(tmp_path):
    write_kaggle_json(tmp_path, '{"username": "u", "key": "' + SECRET)  # truncated JSON
    with pytest.raises(hub.KaggleAuthError, match="not valid JSON") as err:
        hub.download(NAME)
    assert SECRET not in str(err.value)


# ------------------------------------------------------------------ server errors


@pytest.mark.parametrize("status, needle", [(403, "accept the licence"), (401, "rejected")])
def test_refusals_explain_and_never_show_the_key(monkeypatch, capsys, caplog, status, needle):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)

    def refuse(handle, path=None, force_download=False):
        raise http_error(status)

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(hub.KaggleAuthError, match=needle) as err:
        hub.download(NAME)
    if status == 403:
        assert "https://www.kaggle.com/models/google/paligemma-2" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    out = capsys.readouterr()
    for text in (str(err.value), repr(err.value), out.out, out.err, caplog.text):
        assert SECRET not in text


def test_explicit_version_is_passed_to_kagglehub(monkeypatch, tiny_params):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    calls = []
    fake_download(monkeypatch, tiny_params, calls)
    hub.download(NAME, version=2)
    assert calls[0][0] == f"{HANDLE}/2"


# ------------------------------------------------------------------ handles


def test_split_handle_reads_an_optional_version():
    assert hub.split_handle(HANDLE) == (HANDLE, None)
    assert hub.split_handle(HANDLE + "/1") == (HANDLE, 1)
    with pytest.raises(ValueError, match="owner"):
        hub.split_handle("google/paligemma-2")


def test_every_registry_handle_parses_and_names_its_model_page():
    for info in CHECKPOINTS.values():
        handle, _ = hub.split_handle(info.kaggle_handle)
        assert hub.model_page(handle).startswith("https://www.kaggle.com/models/google/paligemma")
        assert info.kaggle_file.endswith(".npz")


# ------------------------------------------------------------------ pk.load(<name>)


def test_pk_load_of_a_registry_name_reads_the_cached_download(tiny_params, tmp_path, capsys):
    import pali_kit as pk

    put_in_cache(tiny_params, tmp_path / "cache")
    model = pk.load(NAME)
    out = capsys.readouterr().err  # a status line: on stderr
    assert NAME in out and f"{model.num_params():,}" in out  # the one-line summary
    assert model.config.llm.vocab_size == TINY.llm.vocab_size  # architecture from the file
    assert model.config.llm.post_norms  # Gemma 2, as the file says
    loaded = flatten(model.params)
    for key, value in flatten(tiny_params).items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), value)
    assert model.logits(np.zeros((1, 8, 8, 3), np.float32), np.ones((1, 4), np.int32),
                        np.zeros((1, 4), np.int32)).shape == (1, 4, 64)  # fmt: skip


def test_pk_load_of_a_registry_name_without_cache_or_credentials_says_what_to_do(tmp_path):
    import pali_kit as pk

    with pytest.raises(Exception, match="(?i)credential|kaggle.json|KAGGLE_KEY"):
        pk.load(NAME)
