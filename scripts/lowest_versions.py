"""Print pip constraints that pin every dependency to the lowest version pyproject.toml allows.

Builds: no file in ``data/`` (prints to stdout). Takes under 1 s. Deterministic:
reads only pyproject.toml.

    python scripts/lowest_versions.py [--extra parity] > constraints.txt
    pip install -c constraints.txt -e .

``make test-min`` installs these and runs the core tests, so the lower bounds
in pyproject.toml are versions CI has run. ``name>=x`` becomes ``name==x``
(jaxlib follows jax); exact pins stay; unbounded names are left out.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _array(text: str, key: str) -> list[str]:
    """The strings of a TOML array ``key = [...]`` (the simple form pyproject.toml uses)."""
    match = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]", text, re.M | re.S)
    if not match:
        raise SystemExit(f"{PYPROJECT}: no array {key!r}")
    return re.findall(r'"([^"]+)"', match.group(1))


def lowest(requirements: list[str]) -> list[str]:
    pins = []
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(>=|==)\s*([^,;\s]+)", req)
        if not match:
            continue
        name, version = match.group(1), match.group(4)
        pins.append(f"{name}=={version}")
        if name == "jax":
            pins.append(f"jaxlib=={version}")
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="optional group to add")
    args = parser.parse_args()
    text = PYPROJECT.read_text()
    requirements = _array(text, "dependencies")
    for extra in args.extra:
        requirements += _array(text, extra)
    print("\n".join(lowest(requirements)))


if __name__ == "__main__":
    main()
