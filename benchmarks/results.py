"""Append a benchmark's Markdown block to benchmarks/RESULTS.md (shared by the scripts here)."""

import os

HEADER = "# Benchmark results (appended by benchmarks/*.py)\n\n"


def append_results(block: str, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(HEADER)
        f.write(block + "\n")
