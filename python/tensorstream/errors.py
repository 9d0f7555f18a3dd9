"""TensorStream's exceptions. Everything the library raises on purpose derives from
:class:`TensorStreamError`; each subclass also derives from the builtin a user would expect
(``ValueError`` for bad arguments and budgets, ``OSError`` for I/O failures).

Errors raised by the Rust core carry their context as attributes: ``path``, ``unit``,
``offset``, ``length`` and, for I/O errors, ``os_errno``.
"""

from __future__ import annotations

import torch


class TensorStreamError(Exception):
    """Base class of every TensorStream error."""

    path: str | None = None
    unit: str | None = None


class ConfigError(TensorStreamError, ValueError):
    """An invalid :class:`tensorstream.Config` value."""


class InvalidArgumentError(TensorStreamError, ValueError):
    """A bad argument to a TensorStream function."""


class BudgetError(TensorStreamError, ValueError):
    """A memory budget that cannot hold what it must (the largest unit plus the prefetch window)."""


class OutOfMemoryError(BudgetError, torch.OutOfMemoryError):
    """The device ran out of memory inside a streamed unit and TensorStream could not retry
    it (or the retry failed too). Also a ``torch.OutOfMemoryError``, so handlers of that
    keep working. The model stays usable."""


class StoreCorruptedError(TensorStreamError):
    """A store or checkpoint that is truncated, malformed or fails its checksums."""


class StoreMismatchError(TensorStreamError):
    """A store that was written for another model."""


class StreamIOError(TensorStreamError, OSError):
    """An I/O error while reading a unit. The model stays usable for the next call."""

    os_errno: int | None = None

    @property
    def errno(self) -> int | None:  # OSError's own field is unset: the core gives os_errno
        return self.os_errno


__all__ = [
    "TensorStreamError",
    "ConfigError",
    "InvalidArgumentError",
    "BudgetError",
    "OutOfMemoryError",
    "StoreCorruptedError",
    "StoreMismatchError",
    "StreamIOError",
]
