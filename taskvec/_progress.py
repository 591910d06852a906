"""One progress bar for the whole package: notebook-aware, silent when asked."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, desc: str | None = None, total: int | None = None, disable: bool | None = None, **kw):
    """tqdm.auto over `iterable`; TASKVEC_NO_PROGRESS=1 silences every bar (CI logs, tests)."""
    if disable is None:
        disable = os.environ.get("TASKVEC_NO_PROGRESS", "") not in ("", "0")
    # delay: loops that finish within a second never draw a bar (no clutter in notebooks or logs)
    kw.setdefault("delay", 1.0)
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, **kw)
