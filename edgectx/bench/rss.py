"""Resident memory of this process: peak (high-water mark) and current, in bytes.

    peak_rss_bytes()  # getrusage's maxrss, which Linux reports in KiB and macOS in bytes
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
