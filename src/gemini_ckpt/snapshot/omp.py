"""Keep the copy threads from each starting an OpenMP team of their own.

torch runs a large `copy_` on all its intra-op threads. Two copy threads doing that at once put
four busy threads on two cores, and the copy runs a third slower. OpenMP's team size is a
per-thread setting, so each copy thread lowers its own to one; the training threads keep theirs.
When the OpenMP runtime cannot be found (another runtime, another platform) nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads"):
            return lib
    return None


def use_one_openmp_thread() -> None:
    """Make torch ops issued by the calling thread run on that thread alone."""
    # torch sizes a thread's OpenMP team when the thread first asks for it (get_num_threads does,
    # without starting a team); ask first so our setting is not overwritten afterwards. Running a
    # parallel op instead would leave an idle OpenMP team behind, which slows every other team.
    torch.get_num_threads()
    lib = _openmp()
    if lib is None:
        log.debug("OpenMP runtime not found; copy threads keep torch's intra-op threads")
        return
    lib.omp_set_num_threads(1)
