"""PNG figures of the benchmark and soak results (matplotlib, Agg: no display needed).

matplotlib is imported on first use, so the rest of the bench (and its tests) runs
without it; it is in the ``bench`` extra.
"""

from __future__ import annotations

import os.path
from pathlib import Path
from typing import Any

#: figure width in inches at 100 dpi: readable on a GitHub page without zooming
WIDTH = 10.0
DPI = 100


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (file output only, whatever DISPLAY says)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG and free it (figures are kept by pyplot until closed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def link(target: Path, page: Path) -> str:
    """``target`` relative to the folder of ``page``: a link that works wherever the checkout is."""
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()
