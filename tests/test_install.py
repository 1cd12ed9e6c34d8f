"""Where the assets are; a non-editable install carries them: sdist -> wheel -> a fresh venv.

The wheel is built from the sdist (so both carry the assets), installed with
``--no-deps`` into a new virtualenv that reuses this environment's packages
(nothing is downloaded), and used from an unrelated folder, without the
repository on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_asset_dir_of_a_checkout_is_data_and_lists_the_sample_images(monkeypatch):
    import pali_kit as pk

    monkeypatch.delenv("PALI_KIT_DATA", raising=False)
    assert pk.asset_dir() == ROOT / "data"
    images = pk.sample_images()
    from pali_kit.assets import IMAGE_SUFFIXES

    on_disk = sorted(
        p.name for p in (ROOT / "data/images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    assert list(images) == on_disk and images[on_disk[0]] == ROOT / "data/images" / on_disk[0]


def test_PALI_KIT_DATA_overrides_the_asset_dir(tmp_path, monkeypatch):
    import pali_kit as pk

    monkeypatch.setenv("PALI_KIT_DATA", str(tmp_path))
    assert pk.asset_dir() == tmp_path and pk.sample_images() == {}


USER_CODE = """
import numpy as np
import pali_kit as pk

assert "site-packages" in pk.__file__, pk.__file__
images = pk.sample_images()
assert {"shapes_0.png", "shapes_1.png"} <= set(images), images
assert all(path.is_file() for path in images.values())
assert pk.asset_dir() == images["shapes_0.png"].parent.parent
model = pk.load("demo")
assert model.name == "pali_kit demo", model.name
[out] = model.generate(images["shapes_0.png"], "caption en", max_new_tokens=12)
assert out.text.strip(), out
vae = pk.load_vae("demo")
masks = pk.reconstruct_masks(vae, np.arange(32).reshape(2, 16))
assert masks.shape == (2, 64, 64) and np.isfinite(masks).all()
print("CAPTION", out.text)
"""


def _run(args, **kw):
    # never the repository's pali_kit through PYTHONPATH, nor its assets through PALI_KIT_DATA
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PALI_KIT_DATA")}
    run = subprocess.run(args, capture_output=True, text=True, env=env, **kw)
    assert run.returncode == 0, f"{args}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _build(tmp: Path) -> Path:
    """sdist of the repository, then a wheel from the unpacked sdist. Returns the wheel."""
    backend = "import setuptools.build_meta as b, sys; print(b.{}(sys.argv[1]))"
    sdist_dir, wheel_dir = tmp / "sdist", tmp / "wheel"
    sdist_dir.mkdir()
    wheel_dir.mkdir()
    name = _run([sys.executable, "-c", backend.format("build_sdist"), str(sdist_dir)], cwd=ROOT)
    with tarfile.open(sdist_dir / name.stdout.split()[-1]) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp / "src", **safe)
    (src,) = (tmp / "src").iterdir()
    name = _run([sys.executable, "-c", backend.format("build_wheel"), str(wheel_dir)], cwd=src)
    return wheel_dir / name.stdout.split()[-1]


@pytest.mark.slow
def test_wheel_from_sdist_installs_the_demo_and_runs_from_anywhere(tmp_path):
    wheel = _build(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pali_kit").rglob("*.py")}
    modules |= {str(p.relative_to(ROOT)) for p in (ROOT / "pali_kit").rglob("*.cc")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assets = {"demo_model.npz", "vae.npz", "tokenizer.model"}
    assets |= {f"images/{p.name}" for p in (ROOT / "data/images").iterdir() if p.suffix != ".md"}
    for dataset in (ROOT / "data").glob("*_dataset"):  # the chapters' datasets
        assets |= {str(p.relative_to(ROOT / "data")) for p in dataset.rglob("*") if p.is_file()}
    missing = {a for a in assets if f"pali_kit/_assets/{a}" not in names}
    assert not missing, f"assets missing from the wheel: {sorted(missing)}"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    _run([*pip, "--no-index", str(wheel)])
    # Then reuse this environment's packages (after the new one's own site-packages, and
    # without their .pth hooks, so an editable pali_kit here cannot shadow the wheel).
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    parents = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(own.stdout.strip(), "reuse.pth").write_text("\n".join(sorted(parents)) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _run([str(python), "-c", textwrap.dedent(USER_CODE)], cwd=elsewhere)
    assert "CAPTION" in run.stdout
