#!/usr/bin/env python3
"""Compare two or more TensorBoard runs: memory, loss and throughput.

Usage::

    fused-ce-compare RUN_A RUN_B [RUN_C ...] --out report/ [--labels a,b,c]

Each RUN is a folder that holds TensorBoard event files (``events.out.tfevents.*``), or a
parent of exactly one such folder: pass torchtitan's ``{dump_folder}`` or ``{dump_folder}/tb``
and the one run folder under it is found (``tb_events.run_folder``). The first run is the
baseline.

The command writes:

* ``OUT/report.png``: loss (every run's line, the baseline's drawn wide underneath so that an
  identical curve does not hide it), the loss difference to the baseline per step, memory
  (from 0 GiB up) and throughput against step, with integer step ticks. A
  ``fused_ce/lse_mean`` panel is added when a run logged it. The title names the runs and
  the memory and tps ratios.
* ``OUT/report.md``: one table row per run. The columns are peak memory, steady-state
  memory, final loss and median tps, each followed by a ratio column against the baseline.
* ``OUT/report.json``: the same numbers at full precision, for scripts and tests.

Definitions. A run's series is its scalar events sorted by step; a step written more than
once keeps its last write.

* peak memory: the maximum of the memory series.
* steady memory: the median of the last half of the memory series, which is the last
  ``ceil(n/2)`` logged points.
* final loss: the loss at the last logged step.
* median tps: the median of all logged ``throughput(tps)`` points.
* tps spread: the interquartile range of the tps points after the first logged one (warm-up),
  divided by their median.
* ratio: this run's value divided by the baseline's value. It is "n/a" when the
  baseline is 0, or when the two runs report memory under different tags.
* noisy: a tps ratio whose distance from 1 is no larger than the two runs' tps spreads added
  (or with fewer than 2 steps after warm-up to judge by). It is printed as ``0.855 (noisy)``
  and the table says it is not a finding.

Memory tags. Any scalar tag under ``memory/`` counts as a memory amount, except
percentages (``...(%)``) and counters (``memory/num_*``). A series whose values are
all <= 0 is ignored; torchtitan logs -1 bytes when the device has no allocator
stats. The table uses the first tag in this order that every run has:
``memory/max_reserved(GiB)``, ``memory/max_active(GiB)``,
``memory/cpu_rss_peak(GiB)``, ``memory/cpu_rss_current(GiB)``, any other tag
containing ``cpu_rss``, then the rest in alphabetical order (the names are
``parallel.metrics``'s; CPU runs log the ``cpu_rss`` ones). If no tag is common to all runs,
each run uses its own first tag and the ratio is "n/a". The table always names the tag it used.

Warnings (stderr and the table): a run folder that holds several event files, i.e. several
runs written into one folder (their steps are merged, the last write of a step wins); and runs
whose seeds differ or were not set or recorded (the trainer records ``debug.seed`` as the text tag
``job/seed``): their losses then differ from step 1 for that alone.

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
import os
import statistics
import sys
from dataclasses import dataclass, field

from benchmarks import tb_events
from benchmarks.bench_common import fmt, ratio
from parallel.metrics import (
    CPU_RSS_CURRENT_TAG,
    CPU_RSS_PEAK_TAG,
    LOSS_TAG,
    LSE_MEAN_TAG,
    MAX_ACTIVE_TAG,
    MAX_RESERVED_TAG,
    MEMORY_PREFIX,
    SEED_TAG,
    TPS_TAG,
    Z_LOSS_TAG,
)

MEMORY_PRIORITY = (MAX_RESERVED_TAG, MAX_ACTIVE_TAG, CPU_RSS_PEAK_TAG, CPU_RSS_CURRENT_TAG)
ReportError = tb_events.EventsError  # a refusal: the message is printed and the process exits with code 2


# ---------------------------------------------------------------- reading runs


@dataclass
class Run:
    label: str
    arg: str  # the path as given
    folder: str  # the folder holding the event files
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> sorted (step, value)
    event_files: int = 1
    seed: str | None = None  # debug.seed as the trainer recorded it ("None": unset); None: not recorded

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.series(tag)]


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
    folder = tb_events.run_folder(arg)
    scalars = tb_events.load_scalars(folder)
    run = Run(label, arg, folder, scalars, len(tb_events.event_files(folder)),
              tb_events.load_texts(folder).get(SEED_TAG))
    missing = [t for t in (LOSS_TAG, TPS_TAG) if not run.series(t)]
    if not memory_tags(run):
        missing.append(f"memory/* (e.g. {MAX_RESERVED_TAG} or {CPU_RSS_PEAK_TAG}, with values > 0)")
    if missing:
        have = ", ".join(sorted(scalars)) or "(no scalars at all)"
        raise ReportError(
            f"{folder}: run '{label}' lacks required tag(s): {'; '.join(missing)}. Tags present: {have}"
        )
    return run


def several_runs_warnings(runs: list[Run]) -> list[str]:
    return [
        f"{r.folder} (run '{r.label}') holds {r.event_files} event files: several runs were written into "
        "one folder, and their steps are merged (the last write of a step wins). Give each run its own "
        "folder, or pass the one you mean."
        for r in runs
        if r.event_files > 1
    ]


def seed_warnings(runs: list[Run]) -> list[str]:
    """Runs trained from different or unknown seeds differ from step 1 for that alone."""
    advice = ("their losses differ from step 1 for that alone: compare runs trained with the same "
              "--debug.seed (e.g. --debug.seed 42 on each)")
    unseeded = [r.label for r in runs if r.seed in (None, "None")]
    if unseeded:
        return [f"run(s) {', '.join(repr(label) for label in unseeded)} set no seed (debug.seed), or did not "
                f"record it; {advice}"]
    if len({r.seed for r in runs}) > 1:
        seeds = ", ".join(f"{r.label!r} {r.seed}" for r in runs)
        return [f"the runs were trained with different seeds ({seeds}); {advice}"]
    return []


# ---------------------------------------------------------------- statistics


def steady(values: list[float]) -> float:
    """Median of the last half of the series: the last ceil(n/2) points."""
    n = len(values)
    return statistics.median(values[n // 2 :])


def spread(values: list[float]) -> float | None:
    """Interquartile range / median of the points after the first (warm-up); None if < 2 points."""
    rest = values[1:]
    if len(rest) < 2 or statistics.median(rest) == 0:
        return None
    q1, _, q3 = statistics.quantiles(rest, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(rest)


def is_noisy(value_ratio: float | None, spread_run: float | None, spread_base: float | None) -> bool:
    """A ratio is noisy when it is within the runs' combined step-to-step spread of 1."""
    if value_ratio is None:
        return False
    if spread_run is None or spread_base is None:
        return True
    return abs(value_ratio - 1) <= spread_run + spread_base


def choose_memory_tags(runs: list[Run]) -> tuple[list[str], bool]:
    """The memory tag for each run's table row, and whether the tags are comparable (all the same)."""
    per_run = [memory_tags(r) for r in runs]
    for tag in per_run[0]:  # in priority order
        if all(tag in tags for tags in per_run[1:]):
            return [tag] * len(runs), True
    return [tags[0] for tags in per_run], False


def _max_or_none(run: Run, tag: str) -> float | None:
    return max(run.values(tag)) if run.series(tag) else None


def summarize(runs: list[Run]) -> dict:
    mem_tags, comparable = choose_memory_tags(runs)
    rows = []
    for run, mtag in zip(runs, mem_tags):
        mem = run.values(mtag)
        loss = run.series(LOSS_TAG)
        lse = run.series(LSE_MEAN_TAG)
        zl = run.series(Z_LOSS_TAG)
        rows.append(
            {
                "label": run.label,
                "folder": run.folder,
                "event_files": run.event_files,
                "memory_tag": mtag,
                "peak_memory": max(mem),
                "steady_memory": steady(mem),
                "final_loss": loss[-1][1],
                "final_step": loss[-1][0],
                "median_tps": statistics.median(run.values(TPS_TAG)),
                "tps_spread": spread(run.values(TPS_TAG)),
                "final_lse_mean": lse[-1][1] if lse else None,
                "max_lse_mean": _max_or_none(run, LSE_MEAN_TAG),
                "final_z_loss": zl[-1][1] if zl else None,
                "num_ooms": _max_or_none(run, "memory/num_ooms"),
                "num_alloc_retries": _max_or_none(run, "memory/num_alloc_retries"),
            }
        )
    base = rows[0]
    for row in rows:
        for key in ("peak_memory", "steady_memory", "final_loss", "median_tps"):
            same_kind = comparable or key in ("final_loss", "median_tps")
            row[key + "_ratio"] = ratio(row[key], base[key]) if same_kind else None
        row["median_tps_ratio_noisy"] = row is not base and is_noisy(
            row["median_tps_ratio"], row["tps_spread"], base["tps_spread"])
    return {"baseline": base["label"], "memory_tags_comparable": comparable, "runs": rows,
            "warnings": several_runs_warnings(runs), "seed_warnings": seed_warnings(runs)}


# ---------------------------------------------------------------- output


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def _tps_ratio_cell(row: dict) -> str:
    return fmt(row["median_tps_ratio"]) + (" (noisy)" if row["median_tps_ratio_noisy"] else "")


def _spread_text(s: float | None) -> str:
    return "n/a" if s is None else f"{100 * s:.1f}%"


def render_markdown(summary: dict) -> str:
    rows = summary["runs"]
    lines = [
        "# Run comparison",
        "",
        f"Baseline (ratios are run / baseline): **{_md_escape(summary['baseline'])}**",
        "",
        "Peak memory is the max over logged steps. Steady memory is the median of the last half "
        f"of the logged steps. Final loss is `{LOSS_TAG}` at the last step. "
        f"Median tps is the median of `{TPS_TAG}` over all logged steps.",
        "",
    ]
    for warning in summary["warnings"] + summary["seed_warnings"]:
        lines += [f"**Warning:** {_md_escape(warning)}", ""]
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
            _tps_ratio_cell(r),
            str(r["final_step"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    noisy = [r for r in rows if r["median_tps_ratio_noisy"]]
    if noisy:
        spreads = ", ".join(f"{_md_escape(r['label'])} {_spread_text(r['tps_spread'])}" for r in rows)
        lines += [
            "",
            f"**Noisy throughput:** the tps ratio of {', '.join(_md_escape(r['label']) for r in noisy)} is within "
            f"the runs' step-to-step tps spread (interquartile range / median after the first step: {spreads}): "
            "not a finding. Measure on an idle machine, with more steps, or as alternating pairs "
            "(`benchmarks/e2e/bench.py --pairs N`).",
        ]

    if any(r["final_lse_mean"] is not None or r["final_z_loss"] is not None for r in rows):
        lines += [
            "",
            "## Fused cross-entropy",
            "",
            f"| run | final {LSE_MEAN_TAG} | max {LSE_MEAN_TAG} | final {Z_LOSS_TAG} |",
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


def title(summary: dict) -> str:
    """'fused vs baseline: peak memory 0.489x, median tps 1.051x' (the ratios of the 2nd run)."""
    rows = summary["runs"]
    others = ", ".join(r["label"] for r in rows[1:])
    text = f"{others} vs {rows[0]['label']}"
    if len(rows) == 2:
        r = rows[1]
        mem = f"{fmt(r['peak_memory_ratio'])}x" if r["peak_memory_ratio"] is not None else "n/a (tags differ)"
        tps = f"{fmt(r['median_tps_ratio'])}x" + (" (noisy)" if r["median_tps_ratio_noisy"] else "")
        text += f": peak memory {mem}, median tps {tps}, final loss {fmt(r['final_loss_ratio'])}x"
    return text


def numbers_text(summary: dict) -> str:
    """The table's numbers as text, for the picture's spare panel."""
    lines = [f"{'run':<12} {'peak mem':>9} {'ratio':>7} {'med tps':>8} {'ratio':>7} {'spread':>7} {'loss':>7}"]
    for r in summary["runs"]:
        lines.append(f"{r['label'][:12]:<12} {fmt(r['peak_memory']):>9} {fmt(r['peak_memory_ratio']):>7} "
                     f"{fmt(r['median_tps']):>8} {fmt(r['median_tps_ratio']):>7} {_spread_text(r['tps_spread']):>7} "
                     f"{fmt(r['final_loss']):>7}")
    lines.append(f"memory tag: {summary['runs'][0]['memory_tag']}")
    if any(r["median_tps_ratio_noisy"] for r in summary["runs"]):
        lines.append("tps ratio within the step-to-step spread: noisy, not a finding")
    return "\n".join(lines)


def _plot(ax, run: Run, tag: str, color, **kw) -> None:
    if run.series(tag):
        steps, vals = zip(*run.series(tag))
        ax.plot(steps, vals, color=color, **kw)


def figure(runs: list[Run], summary: dict):
    """The picture as a matplotlib Figure: panels loss, loss difference[, lse_mean] / memory, tps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_lse = any(r.series(LSE_MEAN_TAG) for r in runs)
    ncols = 3 if with_lse else 2
    fig, grid = plt.subplots(2, ncols, figsize=(6 * ncols, 8.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])

    def color(i):
        return colors[i % len(colors)]

    def line_kw(i):  # the baseline wide and pale underneath, the others thin and dashed on top
        return dict(lw=5, alpha=0.45) if i == 0 else dict(lw=1.5, ls="--", marker=".", zorder=3)

    ax_loss, ax_diff = grid[0][0], grid[0][1]
    for i, run in enumerate(runs):
        _plot(ax_loss, run, LOSS_TAG, color(i), label=run.label, **line_kw(i))
    ax_loss.set_title(f"loss ({LOSS_TAG})")

    base_loss = dict(runs[0].series(LOSS_TAG))
    ax_diff.axhline(0.0, color=color(0), lw=1)
    for i, run in enumerate(runs[1:], 1):
        common = [(s, v) for s, v in run.series(LOSS_TAG) if base_loss.get(s)]
        if common:
            steps = [s for s, _ in common]
            ax_diff.plot(steps, [(v - base_loss[s]) / abs(base_loss[s]) for s, v in common],
                         color=color(i), marker=".", label=f"{run.label} - {runs[0].label}")
    ax_diff.set_title(f"loss difference: (run - {runs[0].label}) / {runs[0].label}")
    ax_diff.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    ax_mem = grid[1][0]
    all_mem_tags = sorted({t for r in runs for t in memory_tags(r)}, key=_memory_priority)
    style = {t: _LINESTYLES[i % len(_LINESTYLES)] for i, t in enumerate(all_mem_tags)}
    table_tags = {row["label"]: row["memory_tag"] for row in summary["runs"]}
    for i, run in enumerate(runs):
        for tag in memory_tags(run):
            used = " *" if tag == table_tags[run.label] else ""
            _plot(ax_mem, run, tag, color(i), linestyle=style[tag], marker=".",
                  label=f"{run.label}: {tag[len(MEMORY_PREFIX):]}{used}")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_title("memory (* = tag in table), from 0")
    ax_mem.set_ylabel("GiB")

    ax_tps = grid[1][1]
    for i, run in enumerate(runs):
        _plot(ax_tps, run, TPS_TAG, color(i), marker=".", label=run.label)
    ax_tps.set_ylim(bottom=0)
    spreads = ", ".join(f"{r['label']} {_spread_text(r['tps_spread'])}" for r in summary["runs"])
    ax_tps.set_title(f"throughput ({TPS_TAG}); spread {spreads}", fontsize="medium")

    if with_lse:
        for i, run in enumerate(runs):
            _plot(grid[0][2], run, LSE_MEAN_TAG, color(i), marker=".", label=run.label)
        grid[0][2].set_title(LSE_MEAN_TAG)
        grid[1][2].axis("off")
        grid[1][2].text(0, 1, numbers_text(summary), family="monospace", va="top", fontsize="small",
                        transform=grid[1][2].transAxes)
    for ax in (ax for row in grid for ax in row if ax.axison):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title(summary) + ("\nWARNING: a folder holds several runs" if summary["warnings"] else ""))
    fig.tight_layout()
    return fig


def render_png(runs: list[Run], summary: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, summary)
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


PROG = "fused-ce-compare"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
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
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    summary = summarize(runs)
    for warning in summary["warnings"] + summary["seed_warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
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
