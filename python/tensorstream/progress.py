"""Progress of writing a store or converting a checkpoint: a tqdm bar on stderr, by
``Config.progress`` (``None``: when stderr is a terminal)."""

from __future__ import annotations

import sys
from typing import Optional


def show_progress(progress: Optional[bool]) -> bool:
    """`progress` when it is True or False; for None, whether stderr is a terminal."""
    if progress is not None:
        return progress
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def bytes_bar(total: int, desc: str, progress: Optional[bool]):
    """A progress bar over `total` bytes written to stderr, or None when it is not shown
    (``update(n)`` as bytes are written, ``close()`` at the end)."""
    if not show_progress(progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)
