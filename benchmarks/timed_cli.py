"""The benchmarks' way to time a whole `hybrid` command: a fresh process, wall-clock seconds."""

import subprocess
import sys
import time


def run_hybrid(*args) -> float:
    """Run `hybrid <args>` (arguments str()-ed) in a fresh process; its wall time in seconds.
    A failing command raises CalledProcessError."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hybrid.cli", *map(str, args)], check=True)
    return time.perf_counter() - start
