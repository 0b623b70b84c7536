"""The sdist and wheel build, the wheel ships what users import (and no harness), and it works in a fresh venv:
``singlora --help`` and a tiny training, importing the installed wheel, not this source tree (``checks/wheel.py``)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from checks import wheel

pytest.importorskip("build")
pytest.importorskip("transformers")


def _fake_dists(tmp_path: Path, modules: set[str], extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A wheel holding ``modules`` (+ ``extra`` files) and a console script, and a matching sdist."""
    whl = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as archive:
        for name in sorted(modules) + list(extra):
            archive.writestr(name, "")
        archive.writestr("fake-0.1.dist-info/entry_points.txt",
                         "[console_scripts]\nsinglora = torch_singlora.cli:main\n")
    sdist = tmp_path / "fake-0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name in ["pyproject.toml", "README.md", *(f"src/{m}" for m in modules)]:
            info = tarfile.TarInfo(f"fake-0.1/{name}")
            archive.addfile(info, io.BytesIO(b""))
    return sdist, whl


def test_content_check_can_fail(tmp_path) -> None:
    shipped = {m for m in wheel.source_files() if Path(m).stem not in wheel.HARNESS_MODULES}
    page = "torch_singlora/serving/static/index.html"
    assert "torch_singlora/cli.py" in shipped and "torch_singlora/gguf_export.py" in shipped and page in shipped
    counts = wheel.check_contents(*_fake_dists(tmp_path, shipped))
    assert counts["wheel_modules"] + counts["wheel_data"] == len(shipped) and counts["wheel_data"] >= 3
    with pytest.raises(wheel.PackagingError, match="missing .'torch_singlora/cli.py'"):
        wheel.check_contents(*_fake_dists(tmp_path, shipped - {"torch_singlora/cli.py"}))
    with pytest.raises(wheel.PackagingError, match=f"missing .'{page}'"):  # package data too
        wheel.check_contents(*_fake_dists(tmp_path, shipped - {page}))
    with pytest.raises(wheel.PackagingError, match="unexpected .'torch_singlora/fuzz.py'"):
        wheel.check_contents(*_fake_dists(tmp_path, shipped | {"torch_singlora/fuzz.py"}))
    with pytest.raises(wheel.PackagingError, match="outside torch_singlora/: .'benchmarks/results/results.md'"):
        wheel.check_contents(*_fake_dists(tmp_path, shipped, extra=("benchmarks/results/results.md",)))


@pytest.mark.slow
def test_wheel_in_a_fresh_venv(tmp_path) -> None:
    result = wheel.check(tmp_path)
    assert result["wheel"] == "torch_singlora-0.1.0-py3-none-any.whl"
    assert Path(result["imported_from"]).is_relative_to(tmp_path / "venv")
