"""One way to make a plot: ``with figure(path, ...) as ax:`` draws on fresh axes and writes ``path`` at the end.

Every plot of the package (loss curves, routing heatmaps, the ablation's figures) and of the benchmarks goes
through it, so the headless backend, the house look (grid, legend, tight layout) and closing the figure (pyplot
keeps every open figure alive otherwise) are set in one place. matplotlib is imported only when a plot is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@contextmanager
def figure(path: str | Path, *, figsize: tuple[float, float], dpi: int = 120, title: str | None = None,
           xlabel: str | None = None, ylabel: str | None = None, grid: bool = True,
           legend: bool | dict[str, Any] = False) -> Iterator[Axes]:
    """Axes of a new figure; on leaving the block the figure is laid out, written to ``path`` (its directory
    made) and closed. A block that raises writes nothing. ``legend``: True, or ``ax.legend``'s keyword
    arguments, adds one after the drawing; the figure is ``ax.figure`` (for a colour bar)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: plots are files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        if title is not None:
            ax.set_title(title)
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        if ylabel is not None:
            ax.set_ylabel(ylabel)
        if grid:
            ax.grid(alpha=0.3)
        yield ax
        if legend:
            ax.legend(**(legend if isinstance(legend, dict) else {}))
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


__all__ = ["figure"]
