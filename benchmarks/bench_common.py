"""What the benchmark scripts share: number formats, Markdown tables, the header of a results
block (title, time, commit, device, versions, command) and appending the block to the log.

Every script prints its block (table last) and appends it to ``benchmarks/log/results.md``
(``--results`` elsewhere, ``--no-append`` not at all). ``benchmarks/RESULTS.md`` is the short
current page, edited by hand from that log.
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_LOG = os.path.join(HERE, "log", "results.md")
LOG_HEADER = "# Benchmark log (appended by benchmarks/*.py; the current numbers are in ../RESULTS.md)\n\n"


# ---------------------------------------------------------------- numbers and tables


def fmt(x, spec: str | None = None, missing: str = "n/a") -> str:
    """``format(x, spec)``; without a spec 4 significant digits, in plain notation from 1e-3 to 1e4
    and as an integer from 1e4 to 1e12 (a tps of 48213). None is ``missing``; strings pass."""
    if x is None:
        return missing
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if spec is not None:
        return format(x, spec)
    if x == 0:
        return "0"
    if 1e4 <= abs(x) < 1e12:
        return f"{x:.0f}"
    return f"{x:.4g}"


def cell(x, spec: str | None = None) -> str:
    """A table cell: as ``fmt``, but blank where there is no value."""
    return fmt(x, spec, missing="")


def ratio(value, base):
    if value is None or base is None or base == 0:
        return None
    return value / base


def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def md_table(rows, columns) -> str:
    """A Markdown table with one (header, cell(row) -> str) pair per column."""
    lines = [md_row([header for header, _ in columns]), "|" + "---|" * len(columns)]
    lines += [md_row([get(r) for _, get in columns]) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the header of a results block


def pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def commit() -> str:
    """The short commit of the code (``+ uncommitted changes`` when the tree differs from it).
    A copy without ``.git`` (a device machine) reads the environment variable GIT_COMMIT."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("GIT_COMMIT", "unknown (no git; set GIT_COMMIT)")


def cpu_name() -> str:
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_name() -> str:
    """The machine's GPUs (count and name), else its CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return cpu_name()


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def header(title: str, device: str | None = None, notes=(),
           packages=("torch", "triton", "torchtitan", "liger_kernel", "cut_cross_entropy")) -> str:
    """The head of a results block; the table follows it."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "\n".join([
        f"## {title} — {now}",
        "",
        f"- commit: {commit()}",
        f"- device: {device or device_name()}",
        f"- versions: {', '.join(f'{p} {pkg_version(p)}' for p in packages)}",
        f"- command: `{command_line()}`",
        *notes,
        "",
        "",
    ])


def append_results(block: str, path: str = RESULTS_LOG) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(LOG_HEADER)
        f.write(block + "\n")


def emit(block: str, results: str, append: bool) -> None:
    """Append the block to ``results`` (if ``append``), then print it: the table is the last output."""
    if append:
        append_results(block, results)
        print(f"(appended to {results})")
    print()
    print(block, flush=True)
