"""Every use of a private name of torch, transformers or datasets, in one place.

Each function says what it reaches for, what it does when the name is gone (the fallback), and why it is worth
it. tests/test_compat.py asserts that each name still exists in the installed versions, so that an upgrade that
moves one fails a test loudly instead of degrading a run silently.
"""

from __future__ import annotations


def shutdown_loader_workers(iterator) -> None:
    """End a DataLoader iterator's worker processes now (torch's private `_shutdown_workers`).

    Fallback: drop the reference and let the iterator's __del__ do the same, which it does at once unless a
    reference cycle or a traceback still holds the iterator.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
