"""Figures as PNG files: an Agg canvas per figure (no pyplot or backend global state), written atomically.

Every stage that draws (gap, select, sft, vla, report, study) uses these two helpers, so a figure
is never half-written and drawing in a worker or a test never changes matplotlib's global backend.
"""

from __future__ import annotations

from pathlib import Path

from .runs import atomic_path


def new_figure(width: float, height: float, dpi: int = 120):
    """A figure drawn by the Agg canvas directly, so no global pyplot/backend state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path, **savefig_kwargs) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, so an HTML page carries its figures inside it."""
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
