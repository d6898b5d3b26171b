"""bnprobe's own event file: the records it writes, framed and checksummed here.

:class:`EventWriter` owns one ``events.out.tfevents.*.bnprobe`` file in a run folder (the logger's
``log_dir``), next to the user's own event file, so TensorBoard reads both as one run. It is not
Lightning's ``SummaryWriter`` on purpose: TensorBoard's ``EventFileWriter`` re-raises its writer
thread's error from every later call, whoever makes it, so a disk error caused by the probe's
writes used to stop the user's own ``self.log`` and ``Trainer.fit``. Here a failed write raises
:class:`EventFileError` once (the recorder's guard turns it into one warning), the file is cut
back to its last whole record, and every later call is a no-op.

A nearly full disk is left to the user: before each write the writer checks that at least
:data:`DISK_RESERVE` bytes would stay free on the file system, and otherwise stops the same way,
so the user's logging keeps the room it had without the probe.

Records are TFRecords (little-endian): ``uint64 length``, ``uint32 masked CRC-32C of length``,
``data``, ``uint32 masked CRC-32C of data``; the data is a serialized ``Event``, built from bytes
(:func:`event_bytes`, no protobuf object a step). The CRC-32C is ``google-crc32c``'s (C; the
``fast-crc`` extra) when installed, else TensorBoard's own pure-Python ``masked_crc32c``, called
(never replaced). Writes are synchronous into a buffer that goes to disk at most every
:data:`FLUSH_SECS` seconds, when it holds :data:`BUFFER_BYTES`, and at :meth:`EventWriter.flush`;
the buffer is one ``bytearray`` written over from flush to flush (a new one each time cost ~500
minor page faults a step at 256 layers with histograms, 1-3 ms of CPU here).
Imports no Lightning; torch only for the image and layout summaries.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DISK_RESERVE = 64 * 2**20
"""bnprobe stops writing events when a write would leave less than this many bytes free on the
file system of its event file (read when a writer is made)."""
FLUSH_SECS = 10.0
"""Buffered records go to disk at least this often while records arrive."""
BUFFER_BYTES = 2**20
"""Buffered records go to disk as soon as they reach this size."""
SUFFIX = ".bnprobe"
"""The end of bnprobe's event file names (TensorBoard reads any name with ``tfevents`` in it)."""

_uid = itertools.count()


def _crc_function() -> Callable[[bytes], int]:
    """``google-crc32c``'s masked CRC-32C in C when installed, else TensorBoard's."""
    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None  # type: ignore[assignment]
    if google_crc32c is not None and getattr(google_crc32c, "implementation", "") == "c":
        value = google_crc32c.value

        def masked(data: bytes) -> int:
            x = int(value(data))
            return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

        return masked
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return masked_crc32c  # type: ignore[no-any-return]


def fast_crc() -> bool:
    """Whether the checksum is ``google-crc32c``'s C one (else TensorBoard's pure Python)."""
    return masked_crc32c.__module__ == __name__


masked_crc32c: Callable[[bytes], int] = _crc_function()
"""TFRecord's masked CRC-32C of bytes (the same numbers as TensorBoard's ``masked_crc32c``)."""
Buffer = bytes | bytearray | memoryview
"""A piece of a serialized message (anything ``bytes.join`` takes)."""
_u32 = struct.Struct("<I").pack
_u64 = struct.Struct("<Q").pack
_f64 = struct.Struct("<d").pack


def record(data: bytes) -> bytes:
    """One TFRecord: ``length``, masked CRC of ``length``, ``data``, masked CRC of ``data``."""
    header = _u64(len(data))
    return header + _u32(masked_crc32c(header)) + data + _u32(masked_crc32c(data))


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (negative: its 64-bit two's complement, 10 bytes)."""
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def event_bytes(step: int, wall_time: float, summary: Buffer | Sequence[Buffer]) -> bytes:
    """The serialized ``Event(wall_time=..., step=..., summary=<summary>)``: the same bytes as
    protobuf's ``SerializeToString`` (fields in number order, zero scalars left out).
    ``summary``: the serialized ``Summary``, or its pieces in order (a list or tuple of
    bytes-like objects, joined once, here)."""
    pieces = summary if isinstance(summary, list | tuple) else (summary,)
    size = sum(map(len, pieces))
    out = b""
    if wall_time != 0.0 or math.copysign(1.0, wall_time) < 0:  # -0.0 too, as protobuf
        out += b"\x09" + _f64(wall_time)
    if step:
        out += b"\x10" + varint(step)
    return b"".join((out, b"\x2a", varint(size), *pieces))


class EventFileError(OSError):
    """bnprobe's event file could not be written (raised once; the writer is off after it)."""


class EventWriter:
    """Writes serialized summaries into bnprobe's own event file in ``log_dir``.

    Offers the few ``SummaryWriter`` methods bnprobe's TensorBoard code uses (``add_summary``,
    ``add_custom_scalars``, ``add_image``, ``flush``, ``close``, ``log_dir``), so the layout and
    figure writers take it as they take a ``SummaryWriter``. The folder and the file are made at
    the first write; a write after :meth:`close` appends to the same file.

    Args:
        log_dir: the run folder (a logger's ``log_dir``).
        reserve: bytes to leave free on the file system (default :data:`DISK_RESERVE`).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, reserve: int | None = None) -> None:
        self.log_dir = os.fspath(log_dir)
        self.reserve = DISK_RESERVE if reserve is None else int(reserve)
        name = "events.out.tfevents.%010d.%s.%s.%s%s" % (  # noqa: UP031  TensorBoard's pattern
            time.time(),
            socket.gethostname(),
            os.getpid(),
            next(_uid),
            SUFFIX,
        )
        self.path = Path(self.log_dir) / name
        self.failure: str | None = None
        """Why the writer stopped (None while it writes)."""
        self._file: Any = None
        self._buffer = bytearray()
        """Records not on disk yet: the first ``_fill`` bytes. Kept, and written over, from one
        flush to the next: a fresh buffer every flush costs page faults (~0.5 ms a MB here)."""
        self._fill = 0
        self._size = 0  # bytes of whole records on disk
        self._flushed = time.monotonic()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def write_summary(
        self, summary: Buffer | Sequence[Buffer], step: int, wall_time: float | None = None
    ) -> None:
        """Add one event holding the serialized ``Summary`` ``summary`` (or its pieces, in
        order) at ``step``."""
        if self.failure is not None:
            return
        wall = time.time() if wall_time is None else wall_time
        data = event_bytes(int(step), wall, summary)
        header = _u64(len(data))
        self._add((header, _u32(masked_crc32c(header)), data, _u32(masked_crc32c(data))))

    def add_summary(
        self, summary: Any, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        """``FileWriter.add_summary``: a ``Summary`` protobuf (or its bytes) at ``global_step``."""
        data = summary if isinstance(summary, bytes) else summary.SerializeToString()
        self.write_summary(data, 0 if global_step is None else global_step, walltime)

    def add_custom_scalars(self, layout: Mapping[str, Any]) -> None:
        """``SummaryWriter.add_custom_scalars``: the Custom Scalars layout at step 0."""
        from torch.utils.tensorboard.summary import custom_scalars

        self.add_summary(custom_scalars(layout))  # type: ignore[no-untyped-call]

    def add_image(
        self,
        tag: str,
        img_tensor: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """``SummaryWriter.add_image``: one image (PNG) at ``global_step``."""
        from torch.utils.tensorboard.summary import image

        summary = image(tag, img_tensor, dataformats=dataformats)  # type: ignore[no-untyped-call]
        self.add_summary(summary, global_step, walltime)

    def flush(self) -> None:
        """Write the buffered records to the file (raises :class:`EventFileError` once)."""
        if self.failure is not None or not self._fill:
            self._flushed = time.monotonic()
            return
        size, self._fill = self._fill, 0
        self._flushed = time.monotonic()
        try:
            self._room(size)
            if self._file is None:
                self._open()
            with memoryview(self._buffer) as view:
                self._file.write(view[:size])
            self._file.flush()
        except OSError as err:
            self._stop(err)
        else:
            self._size += size

    def close(self) -> None:
        """Flush and close the file (idempotent; raises :class:`EventFileError` once)."""
        try:
            self.flush()
        finally:
            if self._file is not None:
                file, self._file = self._file, None
                try:
                    file.close()
                except OSError as err:
                    self._stop(err)

    # -- internals ------------------------------------------------------------------------------
    def _add(self, pieces: tuple[bytes, ...]) -> None:
        """Buffer one record (its pieces, in order); flush at :data:`BUFFER_BYTES` or after
        :data:`FLUSH_SECS`. The buffer grows to the largest run of records between flushes and
        is reused."""
        size = sum(map(len, pieces))
        if self._fill + size > len(self._buffer):
            if self._fill:
                self.flush()
            if size > len(self._buffer):
                self._buffer = bytearray(max(size, 2 * BUFFER_BYTES))
        at = self._fill
        for piece in pieces:
            self._buffer[at : at + len(piece)] = piece
            at += len(piece)
        self._fill = at
        if at >= BUFFER_BYTES or time.monotonic() - self._flushed > FLUSH_SECS:
            self.flush()

    def _open(self) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        first = Event(wall_time=time.time(), file_version="brain.Event:2")
        first.source_metadata.writer = "bnprobe"
        head = record(first.SerializeToString())
        self._room(len(head))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115  closed in close()
        self._size = self._file.tell()
        if self._size == 0:
            self._file.write(head)
            self._size = len(head)

    def _room(self, nbytes: int) -> None:
        """Raise OSError when writing ``nbytes`` would leave under ``reserve`` bytes free."""
        if self.reserve <= 0:
            return
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free - nbytes < self.reserve:
            raise OSError(
                f"the disk of {self.log_dir!r} is nearly full ({free / 2**20:.1f} MiB free; "
                f"bnprobe leaves {self.reserve / 2**20:.0f} MiB to your own logging)"
            )

    def _stop(self, err: OSError) -> None:
        """Switch off: drop the buffer, cut the file back to its whole records, raise once."""
        self._fill = 0
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
        try:
            if self.path.exists() and self.path.stat().st_size > self._size:
                os.truncate(self.path, self._size)
        except OSError:
            pass
        self.failure = f"{type(err).__name__}: {err}"
        raise EventFileError(
            f"bnprobe's event file {str(self.path)!r} could not be written ({err}); bnprobe "
            "writes no more TensorBoard events there, and your own logging is not affected"
        ) from err


__all__ = [
    "BUFFER_BYTES",
    "DISK_RESERVE",
    "FLUSH_SECS",
    "SUFFIX",
    "EventFileError",
    "EventWriter",
    "event_bytes",
    "fast_crc",
    "masked_crc32c",
    "record",
    "varint",
]
