"""Run one command and write its own wall time, CPU and peak RSS as JSON: ``measured.py OUT.json CMD...``.

Why a launcher: on Linux a child's ``ru_maxrss`` starts at its parent's peak RSS, because ``exec`` records
the high-water mark of the address space it replaces, and a ``vfork``-ed child (Python's ``subprocess``)
replaces the parent's. The benchmark harness holds 1M-row frames, so every client it spawned directly
reported the harness's ~380 MB, not its own. Spawned from this small process instead, a client's figure is
its own peak (or this launcher's ~10 MB, whichever is larger).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    figures = {
        "returncode": code,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "maxrss_mb": usage.ru_maxrss / 1024.0,  # Linux: kilobytes
    }
    with open(out, "w") as f:
        json.dump(figures, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
