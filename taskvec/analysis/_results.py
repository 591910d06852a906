"""Base class of analysis results: tidy tables that print, render in notebooks, plot and save themselves."""
from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from taskvec.errors import OutputError


def write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    """Write a CSV under `path` via a temp file in the same folder + rename."""
    from taskvec.viz.style import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as fh:
        df.to_csv(fh, index=False)
    return path


class AnalysisResult:
    """Holds tidy DataFrames; subclasses say which ones (`tables`) and how to plot them."""

    #: Short name used in file names (`cosine`, `profile`, ...).
    kind: str = "result"

    def tables(self) -> dict[str, pd.DataFrame]:
        """Named tidy tables this result holds (each written as a CSV by `to_csv`)."""
        raise NotImplementedError

    def summary(self) -> list[str]:
        """A few lines that say what was found (headline numbers)."""
        return []

    def plot(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- display -------------------------------------------------------------------------------
    def _main_table(self) -> pd.DataFrame:
        return next(iter(self.tables().values()))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}:"] + [f"  {s}" for s in self.summary()]
        t = self._main_table()
        with pd.option_context("display.max_rows", 12, "display.width", 120, "display.max_columns", 12):
            lines.append(str(t))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        t = self._main_table()
        with pd.option_context("display.max_rows", 20, "display.max_columns", 14):
            table = t.to_html(index=False, float_format=lambda v: f"{v:.4g}", max_rows=20)
        items = "".join(f"<li>{html.escape(s)}</li>" for s in self.summary())
        return f"<div><b>{html.escape(type(self).__name__)}</b><ul>{items}</ul>{table}</div>"

    # -- output --------------------------------------------------------------------------------
    def to_csv(self, dir: str | os.PathLike, prefix: str | None = None) -> list[Path]:
        """Write every table as DIR/PREFIX-TABLE.csv (atomically). Returns the paths."""
        out = Path(dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"can't create output directory {str(out)!r}: {e}") from e
        prefix = prefix or self.kind
        return [write_csv_atomic(df, out / f"{prefix}-{name}.csv") for name, df in self.tables().items()]
