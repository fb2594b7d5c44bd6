"""Run the kmsfs command, then print the process's peak resident memory (KiB) on stderr.

VmHWM, not getrusage: ru_maxrss survives exec and would report the parent's peak.
Usage: python tests/format/rss_probe.py <kmsfs arguments...>
"""

import re
import sys

from kmsfs.cli import main

try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        peak = re.search(r"VmHWM:\s+(\d+)", status.read())
    print(peak.group(1) if peak else "0", file=sys.stderr)
sys.exit(code)
