"""Opt-in: a C CRC-32C for TensorBoard's event writer, only while asked for, then put back.

TensorBoard frames every event record with a masked CRC-32C that it computes in pure Python, byte
by byte (``tensorboard.summary.writer.record_writer.masked_crc32c``, about 85 ns a byte on the
writer thread, holding the GIL). At bnprobe's defaults this costs little (benchmarks/crc.py
measures it, docs/performance.md has the numbers), so bnprobe does NOT touch it by default.

``fast_checksums()`` is the explicit opt-in: with the optional ``google-crc32c`` package
(``pip install "bnprobe[fast-crc]"``, Apache-2.0, a C library) it has the record writer use
:func:`masked_crc32c` until the block (or, for the callback, the fit) ends, after checking that
both functions agree on sample records. The record writer reads the function from its module on
every record, so while it is in use every TensorBoard writer of the process gets it (the files
are byte for byte the same); it is put back when the last user leaves, unless someone replaced it
again meanwhile (then theirs stays). Imports no Lightning and no torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_users = 0
_original: Callable[[bytes], int] | None = None


def available() -> bool:
    """Whether ``google-crc32c`` is installed with its C implementation."""
    try:
        import google_crc32c
    except ImportError:
        return False
    return bool(getattr(google_crc32c, "implementation", "") == "c")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (TensorBoard's ``masked_crc32c``), computed by
    ``google-crc32c``."""
    import google_crc32c

    x = int(google_crc32c.value(bytes(data)))
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _agrees(reference: Callable[[bytes], int]) -> bool:
    sample = bytes(range(256)) * 9
    return all(masked_crc32c(sample[:k]) == reference(sample[:k]) for k in (0, 5, 63, 1027, 2304))


def install() -> bool:
    """Start using :func:`masked_crc32c` in TensorBoard's record writer (counted: each call
    needs one :func:`uninstall`). Returns False, changing nothing, when ``google-crc32c`` is
    missing or disagrees with TensorBoard's own function."""
    global _users, _original
    if not available():
        return False
    from tensorboard.summary.writer import record_writer

    with _lock:
        if _users == 0:
            current = record_writer.masked_crc32c
            if not _agrees(current):
                return False
            _original = current
            record_writer.masked_crc32c = masked_crc32c
        _users += 1
    return True


def uninstall() -> None:
    """Undo one :func:`install`; the last one puts TensorBoard's function back."""
    global _users, _original
    from tensorboard.summary.writer import record_writer

    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0:
            if record_writer.masked_crc32c is masked_crc32c and _original is not None:
                record_writer.masked_crc32c = _original
            _original = None


@contextmanager
def fast_checksums() -> Iterator[bool]:
    """``with fast_checksums() as fast:`` TensorBoard's event records are checksummed in C
    inside the block (``fast`` is False, and nothing changes, without ``google-crc32c``)."""
    installed = install()
    try:
        yield installed
    finally:
        if installed:
            uninstall()


__all__ = ["available", "fast_checksums", "install", "masked_crc32c", "uninstall"]
