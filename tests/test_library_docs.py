"""Every code block of docs/library.md runs as written ("Use it from your own code").

A block starting ``# save as NAME`` is written to NAME in a fresh folder (``... and run it``:
then run there by a fresh Python process, in order); every other block is executed in-process,
in that folder, under JAX's default dtype promotion (as a user's code runs).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
SAVE_AS = re.compile(r"# save as (\S+?\.py)( and run it)?\n")


def _name(block: str) -> str:
    """The section a block is in (its id in the test report)."""
    text = DOC.read_text()
    before = text[: text.index(block)]
    return re.findall(r"^## (.*)$", before, flags=re.M)[-1]


INLINE = [b for b in BLOCKS if not SAVE_AS.match(b)]
FILES = [b for b in BLOCKS if SAVE_AS.match(b)]


def test_the_page_has_every_example():
    text = DOC.read_text()
    for needle in (
        "nnx.split",
        "eqx.partition",
        "BatchNorm",
        "bfloat16",
        "make_projection",
        "load_subspace",
        "jax.jvp",
        "jacfwd",
        "Pitfalls",
    ):
        assert needle in text, needle
    assert len(INLINE) >= 6 and len(FILES) == 3
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "docs/library.md" in readme


@pytest.mark.slow
@pytest.mark.parametrize("block", INLINE, ids=[_name(b) for b in INLINE])
def test_inline_example_runs(block, tmp_path, monkeypatch, capsys):
    if "import equinox" in block:
        pytest.importorskip("equinox")
    monkeypatch.chdir(tmp_path)
    # An example may register a projection: the registry is restored for the other tests.
    from subspace_jax.projections import _base

    monkeypatch.setattr(_base, "_REGISTRY", dict(_base._REGISTRY))
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(block, str(DOC), "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out  # every example prints what it shows


@pytest.mark.slow
def test_save_and_reload_in_another_process(tmp_path):
    runs = []
    for block in FILES:
        name, run = SAVE_AS.match(block).groups()
        (tmp_path / name).write_text(block)
        if run:
            runs.append(name)
    assert runs == ["train_and_save.py", "reload.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    for name in runs:
        proc = subprocess.run(
            [sys.executable, name],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
    assert "the same predictions, bit for bit" in proc.stdout
