"""What every part of the benchmark runner shares: where things are and the progress log.

``ROOT`` is the repository (every process of a run starts there), ``RESULTS`` where the
JSON report and profiles go, ``SERVERS_DIR`` the embedded Redis and Postgres of the
benchmark, ``PY`` the Python running the benchmark (and its child processes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVERS_DIR = ROOT / ".data" / "bench-servers"
PY = sys.executable


def log(msg: str) -> None:
    """One progress line on stderr, stamped with the time of day."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
