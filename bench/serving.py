"""The serving benchmark (`pdserve bench`) as a script: drive an OpenAI-compatible server over
HTTP and report TTFT, TPOT, ITL, E2E, throughput and goodput. Run with --help for the flags."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving_bench.cli import build_parser, run_from_args  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_from_args(build_parser("bench/serving.py").parse_args()))
