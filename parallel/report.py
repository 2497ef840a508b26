"""Compare two or more TensorBoard runs: memory, loss and throughput.

Usage::

    python -m parallel.report RUN_A RUN_B [RUN_C ...] --out report/ [--labels a,b,c]

Each RUN is either a folder that contains TensorBoard event files
(``events.out.tfevents.*``), or a parent of exactly one such folder. For example,
pass torchtitan's ``{dump_folder}`` or ``{dump_folder}/tb`` and the single
``tb/{YYYYmmdd-HHMM}`` folder under it is found. The first run is the baseline.

The command writes:

* ``OUT/report.png``: side-by-side panels of memory, loss
  (``loss_metrics/global_avg_loss``) and throughput (``throughput(tps)``) against
  step. A ``fused_ce/lse_mean`` panel is added when a run logged it.
* ``OUT/report.md``: one table row per run. The columns are peak memory, steady-state
  memory, final loss and median tps, each followed by a ratio column against the baseline.
* ``OUT/report.json``: the same numbers at full precision, for scripts and tests.

Definitions. A run's series is its scalar events sorted by step. If one step was
written more than once (for example, a restart into the same folder), the last one
written is kept.

* peak memory: the maximum of the memory series.
* steady memory: the median of the last half of the memory series, which is the last
  ``ceil(n/2)`` logged points.
* final loss: the loss at the last logged step.
* median tps: the median of all logged ``throughput(tps)`` points.
* ratio: this run's value divided by the baseline's value. It is "n/a" when the
  baseline is 0, or when the two runs report memory under different tags.

Memory tags. Any scalar tag under ``memory/`` counts as a memory amount, except
percentages (``...(%)``) and counters (``memory/num_*``). A series whose values are
all <= 0 is ignored; torchtitan logs -1 bytes when the device has no allocator
stats. The table uses the first tag in this order that every run has:
``memory/max_reserved(GiB)``, ``memory/max_active(GiB)``,
``memory/cpu_rss_peak(GiB)``, ``memory/cpu_rss_current(GiB)``, any other tag
containing ``cpu_rss``, then the rest in alphabetical order. CPU runs log the
``cpu_rss`` tags: ``parallel/cpu_shims.py`` renames torchtitan's tags, and
``parallel.metrics.cpu_memory_metrics`` also writes them. If no tag is common to all runs, each run uses
its own first tag and the ratio is "n/a". The table always names the tag it used.
The plot draws every memory-amount tag: a colour for each run and a line style for
each tag.

Numbers are printed by ``fmt`` with 4 significant digits, in plain notation for
magnitudes between 1e-3 and 1e4. Values from 1e4 to 1e12 are printed as integers,
for example a tps of 48213.

Refusals exit with code 2 and a message that names the folder. This happens for a
missing path, a folder with no event files, a parent with several event folders,
or a run that lacks a required tag (loss, tps, or any usable memory tag).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

LOSS_TAG = "loss_metrics/global_avg_loss"
TPS_TAG = "throughput(tps)"
LSE_TAG = "fused_ce/lse_mean"
ZLOSS_TAG = "fused_ce/z_loss"
MEMORY_PREFIX = "memory/"
MEMORY_PRIORITY = (
    "memory/max_reserved(GiB)",
    "memory/max_active(GiB)",
    # CPU runs: parallel/cpu_shims.py renames max_reserved -> cpu_rss_peak, max_active -> cpu_rss_current.
    "memory/cpu_rss_peak(GiB)",
    "memory/cpu_rss_current(GiB)",
)


class ReportError(Exception):
    """A refusal: the message is printed and the process exits with code 2."""


# ---------------------------------------------------------------- formatting


def fmt(x: float | None) -> str:
    """Format a table number with 4 significant digits (see the module docstring)."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e4 <= ax < 1e12:
        return f"{x:.0f}"
    return f"{x:.4g}"


# ---------------------------------------------------------------- reading runs


def _has_events(folder: str) -> bool:
    try:
        return any(
            "tfevents" in name and os.path.isfile(os.path.join(folder, name))
            for name in os.listdir(folder)
        )
    except OSError:
        return False


def resolve_run_dir(path: str) -> str:
    """Return the folder with the event files: ``path`` itself, or its one events-bearing descendant."""
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise ReportError(f"{path}: not a folder (pass the run folder that holds the event files)")
    if _has_events(path):
        return path
    found = sorted(root for root, _dirs, _files in os.walk(path) if _has_events(root))
    if not found:
        raise ReportError(
            f"{path}: no TensorBoard event files (events.out.tfevents.*) in this folder "
            "or any folder under it"
        )
    if len(found) > 1:
        listing = "\n  ".join(found)
        raise ReportError(
            f"{path}: holds {len(found)} folders with event files; pass one of them:\n  {listing}"
        )
    return found[0]


@dataclass
class Run:
    label: str
    arg: str  # the path as given
    folder: str  # the folder holding the event files
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> sorted (step, value)

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.series(tag)]


def _dedupe(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    by_step: dict[int, float] = {}
    for step, value in points:  # in file order: the last write of a step wins
        by_step[int(step)] = float(value)
    return sorted(by_step.items())


def load_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in ``folder``'s event files, via EventAccumulator (reads every event)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get("scalars", []):
        out[tag] = _dedupe([(e.step, e.value) for e in acc.Scalars(tag)])
    # Writers that use the new-style format store scalars as 0-d tensors.
    tensor_tags = [t for t in tags.get("tensors", []) if t not in out]
    if tensor_tags:
        from tensorboard.util import tensor_util

        for tag in tensor_tags:
            points = []
            for e in acc.Tensors(tag):
                arr = tensor_util.make_ndarray(e.tensor_proto)
                if arr.size == 1 and arr.dtype.kind in "fiu":
                    points.append((e.step, float(arr.reshape(()))))
            if points:
                out[tag] = _dedupe(points)
    return out


def is_memory_amount(tag: str) -> bool:
    return (
        tag.startswith(MEMORY_PREFIX)
        and not tag.endswith("(%)")
        and not tag.startswith(MEMORY_PREFIX + "num_")
    )


def memory_tags(run: Run) -> list[str]:
    """This run's usable memory-amount tags, in priority order."""
    usable = [
        t for t in run.scalars if is_memory_amount(t) and any(v > 0 for v in run.values(t))
    ]
    return sorted(usable, key=_memory_priority)


def _memory_priority(tag: str) -> tuple[int, str]:
    if tag in MEMORY_PRIORITY:
        return (MEMORY_PRIORITY.index(tag), tag)
    if "cpu_rss" in tag:
        return (len(MEMORY_PRIORITY), tag)
    return (len(MEMORY_PRIORITY) + 1, tag)


def load_run(arg: str, label: str) -> Run:
    folder = resolve_run_dir(arg)
    try:
        scalars = load_scalars(folder)
    except Exception as e:  # a corrupt or unreadable event file
        raise ReportError(f"{folder}: cannot read TensorBoard events: {type(e).__name__}: {e}") from e
    run = Run(label=label, arg=arg, folder=folder, scalars=scalars)
    missing = [t for t in (LOSS_TAG, TPS_TAG) if not run.series(t)]
    if not memory_tags(run):
        missing.append("memory/* (e.g. memory/max_reserved(GiB) or memory/cpu_rss_peak(GiB), with values > 0)")
    if missing:
        have = ", ".join(sorted(scalars)) or "(no scalars at all)"
        raise ReportError(
            f"{folder}: run '{label}' lacks required tag(s): {'; '.join(missing)}. Tags present: {have}"
        )
    return run


# ---------------------------------------------------------------- statistics


def steady(values: list[float]) -> float:
    """Median of the last half of the series: the last ceil(n/2) points."""
    n = len(values)
    return statistics.median(values[n // 2 :])


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def choose_memory_tags(runs: list[Run]) -> tuple[list[str], bool]:
    """The memory tag for each run's table row, and whether the tags are comparable (all the same)."""
    per_run = [memory_tags(r) for r in runs]
    for tag in per_run[0]:  # in priority order
        if all(tag in tags for tags in per_run[1:]):
            return [tag] * len(runs), True
    return [tags[0] for tags in per_run], False


def summarize(runs: list[Run]) -> dict:
    mem_tags, comparable = choose_memory_tags(runs)
    rows = []
    for run, mtag in zip(runs, mem_tags):
        mem = run.values(mtag)
        loss = run.series(LOSS_TAG)
        lse = run.series(LSE_TAG)
        zl = run.series(ZLOSS_TAG)
        rows.append(
            {
                "label": run.label,
                "folder": run.folder,
                "memory_tag": mtag,
                "peak_memory": max(mem),
                "steady_memory": steady(mem),
                "final_loss": loss[-1][1],
                "final_step": loss[-1][0],
                "median_tps": statistics.median(run.values(TPS_TAG)),
                "final_lse_mean": lse[-1][1] if lse else None,
                "max_lse_mean": max(v for _, v in lse) if lse else None,
                "final_z_loss": zl[-1][1] if zl else None,
                "num_ooms": max(run.values("memory/num_ooms")) if run.series("memory/num_ooms") else None,
                "num_alloc_retries": (
                    max(run.values("memory/num_alloc_retries"))
                    if run.series("memory/num_alloc_retries")
                    else None
                ),
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("peak_memory", "steady_memory", "final_loss", "median_tps"):
            same_kind = comparable or key in ("final_loss", "median_tps")
            row[key + "_ratio"] = ratio(row[key], base[key]) if same_kind else None
    return {"baseline": base["label"], "memory_tags_comparable": comparable, "runs": rows}


# ---------------------------------------------------------------- output


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(summary: dict) -> str:
    rows = summary["runs"]
    lines = [
        "# Run comparison",
        "",
        f"Baseline (ratios are run / baseline): **{_md_escape(summary['baseline'])}**",
        "",
        "Peak memory is the max over logged steps. Steady memory is the median of the last half "
        "of the logged steps. Final loss is `loss_metrics/global_avg_loss` at the last step. "
        "Median tps is the median of `throughput(tps)` over all logged steps.",
        "",
    ]
    if not summary["memory_tags_comparable"]:
        lines += [
            "**Warning:** the runs share no memory tag, so the memory ratios are n/a. "
            "Compare the memory columns with care.",
            "",
        ]
    header = [
        "run",
        "memory tag",
        "peak memory",
        "peak memory ratio",
        "steady memory",
        "steady memory ratio",
        "final loss",
        "final loss ratio",
        "median tps",
        "median tps ratio",
        "last step",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for r in rows:
        cells = [
            _md_escape(r["label"]),
            f"`{_md_escape(r['memory_tag'])}`",
            fmt(r["peak_memory"]),
            fmt(r["peak_memory_ratio"]),
            fmt(r["steady_memory"]),
            fmt(r["steady_memory_ratio"]),
            fmt(r["final_loss"]),
            fmt(r["final_loss_ratio"]),
            fmt(r["median_tps"]),
            fmt(r["median_tps_ratio"]),
            str(r["final_step"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    if any(r["final_lse_mean"] is not None or r["final_z_loss"] is not None for r in rows):
        lines += [
            "",
            "## Fused cross-entropy",
            "",
            "| run | final fused_ce/lse_mean | max fused_ce/lse_mean | final fused_ce/z_loss |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {_md_escape(r['label'])} | {fmt(r['final_lse_mean'])} | "
                f"{fmt(r['max_lse_mean'])} | {fmt(r['final_z_loss'])} |"
            )

    if any(r["num_ooms"] is not None or r["num_alloc_retries"] is not None for r in rows):
        lines += ["", "## Allocator events", "", "| run | max num_ooms | max num_alloc_retries |", "|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {_md_escape(r['label'])} | {fmt(r['num_ooms'])} | {fmt(r['num_alloc_retries'])} |")

    lines += ["", "## Sources", ""]
    for r in rows:
        lines.append(f"- {_md_escape(r['label'])}: `{r['folder']}`")
    return "\n".join(lines) + "\n"


_LINESTYLES = ("-", "--", ":", "-.")


def render_png(runs: list[Run], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_lse = any(r.series(LSE_TAG) for r in runs)
    n = 4 if with_lse else 3
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])

    all_mem_tags = sorted({t for r in runs for t in memory_tags(r)}, key=_memory_priority)
    style = {t: _LINESTYLES[i % len(_LINESTYLES)] for i, t in enumerate(all_mem_tags)}
    table_tags = {row["label"]: row["memory_tag"] for row in summary["runs"]}
    ax = axes[0]
    for i, run in enumerate(runs):
        for tag in memory_tags(run):
            steps, vals = zip(*run.series(tag))
            used = " *" if tag == table_tags[run.label] else ""
            ax.plot(
                steps, vals, linestyle=style[tag], color=colors[i % len(colors)], marker=".",
                label=f"{run.label}: {tag[len(MEMORY_PREFIX):]}{used}",
            )
    ax.set_title("memory (* = tag in table)")
    ax.set_ylabel("memory (unit as in tag)")

    for ax, tag, title in (
        (axes[1], LOSS_TAG, "loss (loss_metrics/global_avg_loss)"),
        (axes[2], TPS_TAG, "throughput (throughput(tps))"),
    ) + (((axes[3], LSE_TAG, "fused_ce/lse_mean"),) if with_lse else ()):
        for i, run in enumerate(runs):
            if run.series(tag):
                steps, vals = zip(*run.series(tag))
                ax.plot(steps, vals, color=colors[i % len(colors)], marker=".", label=run.label)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"baseline: {summary['baseline']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def _labels(args_runs: list[str], labels_opt: str | None) -> list[str]:
    if labels_opt is not None:
        labels = [s.strip() for s in labels_opt.split(",")]
        if len(labels) != len(args_runs):
            raise ReportError(
                f"--labels has {len(labels)} label(s) ({labels_opt!r}) for {len(args_runs)} run(s)"
            )
        if any(not s for s in labels) or len(set(labels)) != len(labels):
            raise ReportError(f"--labels must be non-empty and distinct: {labels_opt!r}")
        return labels
    labels = [os.path.basename(os.path.normpath(a)) or a for a in args_runs]
    if len(set(labels)) != len(labels):
        labels = [os.path.normpath(a) for a in args_runs]
    if len(set(labels)) != len(labels):
        labels = [f"{l}#{i}" for i, l in enumerate(labels)]
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parallel.report",
        description="Compare TensorBoard runs (memory, loss, throughput). The first run is the baseline.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder (or a parent of exactly one)")
    parser.add_argument("--out", required=True, help="output folder for report.png / report.md / report.json")
    parser.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) < 2:
            raise ReportError(f"need at least two runs to compare, got {len(args.runs)}: {args.runs[0]}")
        labels = _labels(args.runs, args.labels)
        runs = [load_run(a, l) for a, l in zip(args.runs, labels)]
    except ReportError as e:
        print(f"parallel.report: error: {e}", file=sys.stderr)
        return 2

    summary = summarize(runs)
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "report.md")
    png_path = os.path.join(args.out, "report.png")
    json_path = os.path.join(args.out, "report.json")
    md = render_markdown(summary)
    with open(md_path, "w") as f:
        f.write(md)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=2)
    render_png(runs, summary, png_path)
    print(md)
    print(f"wrote {png_path}, {md_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
