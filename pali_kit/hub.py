"""Official checkpoints from Kaggle, by registry name.

    path = download("paligemma2-3b-pt-224")      # -> Path to the .npz

Where the file comes from, first hit wins:

1. kagglehub's cache (``$KAGGLEHUB_CACHE``, default ``~/.cache/kagglehub``),
   laid out as ``models/<owner>/<model>/<framework>/<variation>/<version>/<file>``:
   no network, no credentials.
2. A model attached to a Kaggle notebook (``/kaggle/input/.../<file>``): no
   credentials.
3. A download with ``kagglehub.model_download`` (it shows its own progress
   bar). Gated models need a Kaggle API key, looked up in this order:
   Colab secrets ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` (or ``KAGGLE_API_TOKEN``),
   the environment variables of the same names, then ``~/.kaggle/kaggle.json``.
   Inside a Kaggle notebook kagglehub attaches the model without a key.

Before the first download, accept the licence on the model page
(https://www.kaggle.com/models/google/paligemma-2) with the same account.
The key is never printed, logged, or put in an error message.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .configs import CheckpointInfo, checkpoint_info
from .errors import PaliKitError

KAGGLE_INPUT = Path("/kaggle/input")  # where Kaggle notebooks mount attached models
KAGGLE_SETTINGS = "https://www.kaggle.com/settings"  # "Create New Token" lives here


class KaggleAuthError(PaliKitError, RuntimeError):
    """No usable Kaggle credentials, or the licence was not accepted; the message says what to do."""


# --- handles ---------------------------------------------------------------------------


def split_handle(handle: str) -> tuple[str, int | None]:
    """``google/paligemma-2/jax/paligemma2-3b-pt-224[/1]`` -> (handle without version, version)."""
    parts = handle.strip("/").split("/")
    if len(parts) == 5 and parts[4].isdigit():
        return "/".join(parts[:4]), int(parts[4])
    if len(parts) != 4:
        raise ValueError(
            f"Kaggle model handle {handle!r}: expected <owner>/<model>/<framework>/<variation>[/<version>]"
        )
    return handle.strip("/"), None


def model_page(handle: str) -> str:
    """The page where the licence is accepted: https://www.kaggle.com/models/<owner>/<model>."""
    owner, model = handle.strip("/").split("/")[:2]
    return f"https://www.kaggle.com/models/{owner}/{model}"


# --- 1. kagglehub's cache --------------------------------------------------------------


def cache_folder() -> Path:
    """kagglehub's cache: ``$KAGGLEHUB_CACHE`` or ``~/.cache/kagglehub``."""
    return Path(os.environ.get("KAGGLEHUB_CACHE", Path.home() / ".cache" / "kagglehub"))


def cached_file(handle: str, file: str, version: int | None = None) -> Path | None:
    """The file in kagglehub's cache, if a complete download is there.

    kagglehub writes ``<variation>/<version>/<file>`` and, once the download
    finished, the marker ``<variation>/.complete/<version>/<file>.complete``.
    Without a version the newest cached one is used.
    """
    variation = cache_folder() / "models" / handle
    if version is None:
        versions = [int(p.name) for p in variation.glob("[0-9]*") if p.name.isdigit()]
    else:
        versions = [version]
    for v in sorted(versions, reverse=True):
        path = variation / str(v) / file
        if path.is_file() and (variation / ".complete" / str(v) / f"{file}.complete").exists():
            return path
    return None


@contextlib.contextmanager
def _cache_env(cache_dir):
    """Point kagglehub (and cached_file) at ``cache_dir`` for the duration."""
    if cache_dir is None:
        yield
        return
    old = os.environ.get("KAGGLEHUB_CACHE")
    os.environ["KAGGLEHUB_CACHE"] = str(cache_dir)
    try:
        yield
    finally:
        if old is None:
            del os.environ["KAGGLEHUB_CACHE"]
        else:
            os.environ["KAGGLEHUB_CACHE"] = old


# --- 2. an attached Kaggle input -------------------------------------------------------


def attached_file(file: str, root: Path | None = None, max_depth: int = 6) -> Path | None:
    """Search a Kaggle notebook's inputs (``/kaggle/input``) for ``file``."""
    root = Path(root or KAGGLE_INPUT)
    if not root.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if file in filenames:
            return Path(dirpath) / file
        if len(Path(dirpath).relative_to(root).parts) >= max_depth:
            dirnames.clear()
    return None


def on_kaggle() -> bool:
    """Inside a Kaggle notebook (kagglehub attaches models there without a key)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


# --- 3. credentials --------------------------------------------------------------------


def find_credentials() -> str | None:
    """Where the Kaggle key comes from ("Colab secrets", ...), or None. Values are never returned.

    Colab secrets are handed to kagglehub directly (``kagglehub.config``); the
    environment variables and kaggle.json are read by kagglehub itself.
    """
    if _colab_secrets():
        return "Colab secrets"
    if os.environ.get("KAGGLE_API_TOKEN") or (
        os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    ):
        return "the KAGGLE_* environment variables"
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if _valid_kaggle_json(folder / "kaggle.json"):
        return str(folder / "kaggle.json")
    if (folder / "access_token").is_file():
        return str(folder / "access_token")
    return None


def _colab_secrets() -> bool:
    """Read the Colab secrets, if running in Colab, and hand them to kagglehub."""
    try:
        from google.colab import userdata  # only importable inside Colab
    except ImportError:
        return False

    def secret(name):
        try:  # missing secret, or notebook access not granted: Colab raises
            return (userdata.get(name) or "").strip() or None
        except Exception:
            return None

    import kagglehub.config

    username, key = secret("KAGGLE_USERNAME"), secret("KAGGLE_KEY")
    if username and key:
        kagglehub.config.set_kaggle_credentials(username, key)
        return True
    token = secret("KAGGLE_API_TOKEN")
    if token:
        kagglehub.config.set_kaggle_api_token(token)
        return True
    return False


def _valid_kaggle_json(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        creds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise KaggleAuthError(
            f"{path} is not valid JSON. Download a fresh one: {KAGGLE_SETTINGS} -> API -> "
            "Create New Token, and save it there."
        ) from None
    if not (isinstance(creds, dict) and creds.get("username") and creds.get("key")):
        raise KaggleAuthError(
            f'{path} needs "username" and "key" entries. Download a fresh one: '
            f"{KAGGLE_SETTINGS} -> API -> Create New Token."
        )
    return True


def _no_credentials(handle: str, file: str) -> KaggleAuthError:
    return KaggleAuthError(
        f"{file} is not cached and no Kaggle API key was found. To download it:\n"
        f"  1. accept the licence on {model_page(handle)} (same account as the key);\n"
        f"  2. create a key at {KAGGLE_SETTINGS} (API -> Create New Token), then either\n"
        "     - Colab: add secrets KAGGLE_USERNAME and KAGGLE_KEY (the key icon on the left),\n"
        "       and allow this notebook to access them;\n"
        "     - elsewhere: set the environment variables KAGGLE_USERNAME and KAGGLE_KEY,\n"
        "       or save kaggle.json as ~/.kaggle/kaggle.json (chmod 600);\n"
        "     - Kaggle notebooks: attach the model (Add Input -> Models), no key needed."
    )


# --- download ------------------------------------------------------------------------------


def download(
    name_or_info: str | CheckpointInfo,
    *,
    cache_dir=None,
    version: int | None = None,
    force_download: bool = False,
) -> Path:
    """The local path of an official checkpoint's .npz, downloading it if needed.

    Args:
      name_or_info: a registry name (``"paligemma2-3b-pt-224"``) or CheckpointInfo.
      cache_dir: kagglehub cache to use (default ``$KAGGLEHUB_CACHE`` or
        ``~/.cache/kagglehub``).
      version: the Kaggle model version (default: the handle's, else the newest
        cached one, else the newest on Kaggle).
      force_download: download again even if cached.

    Raises:
      KaggleAuthError: no credentials, rejected credentials, or licence not
        accepted; the message says what to do.
    """
    info = checkpoint_info(name_or_info) if isinstance(name_or_info, str) else name_or_info
    handle, handle_version = split_handle(info.kaggle_handle)
    version = version or handle_version
    file = info.kaggle_file
    with _cache_env(cache_dir):
        if not force_download:
            found = cached_file(handle, file, version) or attached_file(file)
            if found is not None:
                return found
        source = find_credentials()
        if source is None and not on_kaggle():
            raise _no_credentials(handle, file)
        return _kagglehub_download(handle, version, file, source, force_download)


def _kagglehub_download(handle, version, file, source, force_download) -> Path:
    import kagglehub
    import requests
    from kagglehub.exceptions import UnauthenticatedError

    full = f"{handle}/{version}" if version else handle
    try:
        return Path(kagglehub.model_download(full, path=file, force_download=force_download))
    except UnauthenticatedError:
        raise _no_credentials(handle, file) from None
    except requests.HTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise KaggleAuthError(
                f"Kaggle rejected the API key from {source}. Create a new one at "
                f"{KAGGLE_SETTINGS} (API -> Create New Token) and replace the old one."
            ) from None
        if status == 403:
            raise KaggleAuthError(
                f"Kaggle refused {full} (403): accept the licence on {model_page(handle)} "
                f"while logged in as the account of the key from {source}, then run this again."
            ) from None
        if status == 404:
            raise FileNotFoundError(
                f"Kaggle has no {file} in {full} (404). Check the name and version on "
                f"{model_page(handle)}."
            ) from None
        raise
    except requests.ConnectionError:
        raise ConnectionError(
            f"cannot reach kaggle.com to download {file}, and it is not in the cache "
            f"({cache_folder()}). Connect to the internet, or download the .npz elsewhere "
            "and pass its path to pk.load."
        ) from None
