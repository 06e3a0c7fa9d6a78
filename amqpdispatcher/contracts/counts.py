"""The count file: a worker's counters where its arbiter can read them after the worker
died (``--processes`` with ``http``).

The arbiter learns a worker's counts by asking it (supervision/endpoint.py); what a
worker counted after the last question would die with it, SIGKILL included. So each
worker keeps its counters in a file of its own beside its socket (COUNTS_SUFFIX
instead of ``.sock``), mapped into its memory: the counting code increments the
file's slots as it would a list (a memoryview of int64 or float64), no lock, no
system call, and the kernel keeps what was written whatever becomes of the process.
Once the worker is gone, the arbiter reads the file and counts its figures in
(``read_counts``).

The file: MAGIC, the header's length (8 bytes, little-endian), the header (JSON),
zeros up to a multiple of 8, the int64 slots, the float64 slots. The header says
which sample each slot is, with the names and labels the worker's ``/metrics`` gives
it, so that the arbiter needs nothing else to read it:

Labels are read in name order, as the arbiter keys samples (supervision/endpoint.py).

- ``{"family", "type", "sample", "labels", "int" | "double"}``: a counter's sample and
  its slot;
- ``{"family", "labels", "le", "buckets", "sum"}``: a histogram's: the slots of its
  bucket counts (not cumulative; the last is +Inf's), and the slot of its sum.

Samples with the same name and labels (two entries sharing a series) are added up.
Standard library only: the arbiter reads it without loading anything else.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any

COUNTS_SUFFIX = ".counts"
MAGIC = b"ADCOUNT1"

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name, its labels
Counted = dict[tuple[str, SampleKey], float]  # (family, sample): value


def counts_path(socket_path: str) -> str:
    """Where the worker serving on ``socket_path`` keeps its counters."""
    return os.path.splitext(socket_path)[0] + COUNTS_SUFFIX


class CountFile:
    """The worker's side: ``ints`` int64 and ``doubles`` float64 slots, zero, in a new
    file at ``path`` described by ``header`` (its list of samples)."""

    def __init__(self, path: str, header: list[dict[str, Any]], ints: int,
                 doubles: int) -> None:
        head = json.dumps(header, separators=(",", ":")).encode()
        start = -(-(len(MAGIC) + 8 + len(head)) // 8) * 8
        size = start + 8 * (ints + doubles)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(size, 8))
            self.map = mmap.mmap(fd, max(size, 8))
        finally:
            os.close(fd)
        self.map[:start] = (MAGIC + struct.pack("<Q", len(head)) + head).ljust(start, b"\0")
        view = memoryview(self.map)
        self.ints = view[start:start + 8 * ints].cast("q")
        self.doubles = view[start + 8 * ints:size].cast("d")


def read_counts(path: str) -> tuple[Counted, dict[str, str]] | None:
    """The arbiter's side: every sample in the file at ``path`` as its (family, sample)
    key in the worker's /metrics, and each family's type; None if there is no such file
    or it is not one (a worker that died before writing it)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
        if data[:len(MAGIC)] != MAGIC:
            return None
        (length,) = struct.unpack_from("<Q", data, len(MAGIC))
        header = json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + length])
        start = -(-(len(MAGIC) + 8 + length) // 8) * 8
        ints_count = sum(_ints(item) for item in header)
        ints = memoryview(data)[start:start + 8 * ints_count].cast("q")
        doubles = memoryview(data)[start + 8 * ints_count:].cast("d")
        counted: Counted = {}
        types: dict[str, str] = {}

        def add(family: str, name: str, labels: list[list[str]], value: float) -> None:
            key = (family, (name, tuple(sorted((k, v) for k, v in labels))))
            counted[key] = counted.get(key, 0.0) + value

        for item in header:
            family, labels = item["family"], item["labels"]
            if "buckets" in item:
                types[family] = "histogram"
                total = 0
                for offset, le in enumerate(item["le"]):
                    total += ints[item["buckets"] + offset]
                    add(family, family + "_bucket", [*labels, ["le", le]], total)
                add(family, family + "_count", labels, total)
                add(family, family + "_sum", labels, doubles[item["sum"]])
            else:
                types[family] = item["type"]
                value = ints[item["int"]] if "int" in item else doubles[item["double"]]
                add(family, item["sample"], labels, value)
        return counted, types
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None


def _ints(item: dict[str, Any]) -> int:
    return len(item["le"]) if "buckets" in item else (1 if "int" in item else 0)
