"""Lower the CPU priority of the calling thread, so background work yields to training's threads.

On Linux a thread is a task of its own, and `setpriority` on its native id changes that thread
alone; elsewhere the call would change the whole process, so nothing is done there. Raising the
nice value needs no privilege; a thread already nicer than asked is left as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> bool:
    """Give the calling thread nice value `nice` (or keep a higher one); True if it is set."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        log.debug("could not lower the priority of thread %d: %s", tid, e)
        return False
    return True
