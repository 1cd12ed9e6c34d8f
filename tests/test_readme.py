"""README.md runs as written: its Python blocks, verbatim, in a fresh process.

Conventions in README.md:
- every ```python block runs, in order, in one fresh Python process started in
  the repository root (like the cells of a notebook), except blocks opened with
  ```python needs-checkpoint, which download or read a real checkpoint;
- a ```text block right after a ```python block is that block's output, and must
  be exactly what it prints (so a change to the demo model or the sample images
  that changes an answer fails here, with the new output in the message).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
SKIP = "needs-checkpoint"
MARK = "----- pali_kit README block {} -----"


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """[(info string, code, shown output or None)] of the README's python blocks."""
    fences = [(m.group(1).strip(), m.group(2), m.start(), m.end()) for m in FENCE.finditer(text)]
    out = []
    for i, (info, code, _, end) in enumerate(fences):
        if info.split()[:1] != ["python"]:
            continue
        shown = None
        if i + 1 < len(fences):
            next_info, next_code, next_start, _ = fences[i + 1]
            if next_info == "text" and not text[end:next_start].strip():
                shown = next_code
        out.append((info, code, shown))
    return out


def test_the_readme_has_runnable_blocks_and_marks_the_others():
    found = blocks(README.read_text())
    runnable = [b for b in found if SKIP not in b[0].split()]
    assert runnable and any(shown is not None for _, _, shown in runnable)
    assert all(info.split() in (["python"], ["python", SKIP]) for info, _, _ in found)


@pytest.mark.slow
def test_readme_python_blocks_run_verbatim_and_print_what_is_shown():
    runnable = [(code, shown) for info, code, shown in blocks(README.read_text())
                if SKIP not in info.split()]  # fmt: skip
    program = "\n".join(
        f"print({MARK.format(i)!r}, flush=True)\n{code}" for i, (code, _) in enumerate(runnable)
    )
    env = {k: v for k, v in os.environ.items() if k != "PALI_KIT_DATA"}
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, f"README code failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    printed = re.split("|".join(re.escape(MARK.format(i)) for i in range(len(runnable))),
                       run.stdout)[1:]  # fmt: skip
    assert len(printed) == len(runnable)
    for (code, shown), got in zip(runnable, printed):
        if shown is not None:
            got = got.strip("\n")
            assert got == shown.strip("\n"), (
                f"README shows\n{shown}\nafter\n{code}\nbut the code prints\n{got}"
            )
