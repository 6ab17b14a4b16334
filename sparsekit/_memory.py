"""Free memory on the host and on a device, read where the operating system or the driver reports it;
glibc's heap kept while pruning (``retained_heap``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where there is no such file."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_bytes(device: torch.device) -> int | None:
    """Free memory where tensors on ``device`` live: the host's MemAvailable for the CPU,
    ``torch.cuda.mem_get_info`` for CUDA; None where unknown."""
    if device.type == "cpu":
        return host_available_bytes()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its own dynamic threshold (64-bit)
HEAP_TRIM_HOLD = 2**31 - 1  # never trim while pruning (mallopt takes an int)
HEAP_TRIM_AFTER = 2 * HEAP_MMAP_THRESHOLD  # what glibc's dynamic rule sets beside that threshold
_heap = {"depth": 0, "lock": threading.Lock()}
log = logging.getLogger(__name__)


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def release_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS (``malloc_trim(0)``); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _heap_tuning_off() -> str | None:
    """Why ``retained_heap`` leaves malloc alone (None: it tunes it)."""
    if os.environ.get("SPARSEKIT_RETAIN_HEAP", "1").strip() == "0":
        return "SPARSEKIT_RETAIN_HEAP=0"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc's own parameters"
    if _glibc() is None:
        return "the C library is not glibc"
    return None


@contextmanager
def retained_heap() -> Iterator[None]:
    """Within: glibc keeps freed memory in the heap (no trim) and serves tensors up to 32 MiB from
    it, instead of mapping fresh zeroed pages for every large activation and unmapping them on free.

    A calibration forward allocates and frees the same activation sizes block after block; with
    glibc's defaults each one can come back as new pages (millions of page faults, up to a fifth of a
    two-core prune's time in system calls, docs/results.md "Pruning speed"). On exit the trim threshold is
    set to 64 MiB and freed pages are returned (``malloc_trim``). The mmap threshold stays at 32 MiB:
    glibc's own dynamic rule reaches that value once a 32 MiB tensor has been freed. Nested uses tune
    once. ``SPARSEKIT_RETAIN_HEAP=0``, malloc settings in ``GLIBC_TUNABLES``, or a C library other
    than glibc leave malloc untouched.
    """
    reason = _heap_tuning_off()
    if reason is not None:
        log.debug("malloc left as it is: %s", reason)
        yield
        return
    libc = _glibc()
    with _heap["lock"]:
        if _heap["depth"] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_HOLD)
        _heap["depth"] += 1
    try:
        yield
    finally:
        with _heap["lock"]:
            _heap["depth"] -= 1
            if _heap["depth"] == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_AFTER)
                libc.malloc_trim(0)
