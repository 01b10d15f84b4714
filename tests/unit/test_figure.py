"""The one figure helper: writes the file on a clean exit, nothing on an error, and never leaves a figure open."""

from pathlib import Path

import pytest

from deepseek_moe.figure import figure


def test_writes_a_png_and_closes(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    path = tmp_path / "sub" / "curve.png"
    with figure(path, figsize=(3, 2), dpi=50, title="t", xlabel="x", ylabel="y", legend={"fontsize": 6}) as ax:
        ax.plot([0, 1], [1, 0], label="line")
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("t", "x", "y")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()] == ["line"]
    assert plt.get_fignums() == []


def test_an_error_in_the_block_writes_nothing(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    path = tmp_path / "broken.png"
    with pytest.raises(ZeroDivisionError), figure(path, figsize=(3, 2)) as ax:
        ax.plot([0, 1], [0, 1 / 0])
    assert not path.exists() and plt.get_fignums() == []
