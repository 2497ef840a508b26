"""CPU tests of the end-to-end benchmark (benchmarks/e2e/): torchtitan log-line parsing, parity, table, and the
driver loop against a fake launcher (no torchtitan, no GPU)."""

from __future__ import annotations

import argparse
import inspect
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.e2e import bench, cases
from benchmarks.e2e import runs as e2e_runs

ROOT = Path(__file__).resolve().parents[2]

# torchtitan 0.2.2 components/metrics.py, MetricsProcessor.log (with tools/utils.py Color codes)
RED, GREEN, ORANGE, TURQ, BLUE, CYAN, MAGENTA, RESET = (
    "\033[31m", "\033[32m", "\033[38;2;180;60;0m", "\033[38;2;54;234;195m",
    "\033[34m", "\033[36m", "\033[35m", "\033[39m")


def titan_line(step, loss, grad_norm=1.2345, mem=52.19, pct=36.5, tps=38328.4, tflops=412.3, mfu=41.7, color=True,
               prefix="[rank0]:[titan] 2026-11-22 02:40:01,123 - root - INFO - "):
    c = (RED, GREEN, ORANGE, TURQ, BLUE, CYAN, MAGENTA, RESET) if color else ("",) * 8
    return prefix + (
        f"{c[0]}step: {step:2}  "
        f"{c[1]}loss: {loss:8.5f}  "
        f"{c[2]}grad_norm: {grad_norm:7.4f}  "
        f"{c[3]}memory: {mem:5.2f}GiB"
        f"({pct:.2f}%)  "
        f"{c[4]}tps: {round(tps):,}  "
        f"{c[5]}tflops: {tflops:,.2f}  "
        f"{c[6]}mfu: {mfu:.2f}%{c[7]}"
    )


# captured verbatim format (ANSI escapes included) of one step line
SAMPLE = ("[rank0]:[titan] 2026-11-22 02:40:01,123 - root - INFO - \x1b[31mstep:  1  \x1b[32mloss: 12.25442  "
          "\x1b[38;2;180;60;0mgrad_norm: 15.0310  \x1b[38;2;54;234;195mmemory: 52.19GiB(36.50%)  "
          "\x1b[34mtps: 1,234  \x1b[36mtflops: 71.80  \x1b[35mmfu: 7.26%\x1b[39m")


def test_sample_line():
    assert titan_line(1, 12.25442, 15.031, 52.19, 36.5, 1234, 71.8, 7.26) == SAMPLE
    sm = e2e_runs.parse_line(SAMPLE)
    assert sm is not None
    assert (sm.step, sm.loss, sm.grad_norm, sm.mem_gib, sm.mem_pct, sm.tps, sm.tflops, sm.mfu, sm.rank) == (
        1, 12.25442, 15.031, 52.19, 36.5, 1234.0, 71.8, 7.26, 0)


@pytest.mark.parametrize("color", [True, False])
@pytest.mark.parametrize("prefix", ["", "[titan] 2026-11-22 02:40:01,123 - root - INFO - ", "[rank1]:[titan] x - root - INFO - "])
def test_variants(color, prefix):
    line = titan_line(123, 2.5, tps=1234567, mem=121.94, pct=85.02, color=color, prefix=prefix)
    sm = e2e_runs.parse_line(line)
    assert sm.step == 123 and sm.loss == 2.5 and sm.tps == 1234567 and sm.mem_gib == 121.94
    assert sm.rank == (1 if prefix.startswith("[rank1]") else None)


def test_non_step_lines_ignored():
    val = ("[titan] t - root - INFO - \x1b[33mvalidate step:  5  \x1b[32mloss:  2.1234  "
           "\x1b[38;2;54;234;195mmemory: 10.00GiB(5.00%)  \x1b[34mtps: 1,000\x1b[39m")
    assert e2e_runs.parse_line(val) is None
    assert e2e_runs.parse_line("[titan] t - root - INFO - Training starts at step 1") is None
    assert e2e_runs.parse_line("warmup_steps: 200") is None


def test_parse_log_lowest_rank_and_nan():
    text = "\n".join([
        titan_line(1, 10.0, prefix="[rank1]:"), titan_line(1, 11.0, prefix="[rank0]:"),
        "some noise", titan_line(2, float("nan")), titan_line(3, 9.0, tps=5000),
    ])
    steps = e2e_runs.parse_log(text)
    assert sorted(steps) == [1, 2, 3]
    assert steps[1].loss == 11.0 and steps[1].rank == 0
    assert steps[2].loss != steps[2].loss  # nan


def _res(mode, losses, mem=10.0, tps=(100, 200, 300), status="ok"):
    r = e2e_runs.RunResult("c", mode, [], "x.log", status=status, expected_steps=len(losses))
    for i, l in enumerate(losses, 1):
        r.steps[i] = e2e_runs.StepMetrics(i, l, 1.0, mem + i * 0.1, 10.0, tps[(i - 1) % len(tps)])
    return r


def test_parity_and_table():
    base = _res("baseline", [10.0, 9.0, 8.0], mem=50.0)
    fused = _res("fused", [10.0, 9.0, 8.004], mem=40.0)
    v, d, tol = cases.parity(base, fused, "bf16")
    assert v == "PASS" and abs(d - 0.004 / 8.0) < 1e-12 and tol == 1e-3
    assert cases.parity(base, fused, "fp32")[0] == "FAIL"
    assert base.max_mem == pytest.approx(50.3) and base.median_tps == 250  # steps 2,3: 200,300
    table, failures = cases.make_table([("fsdp2", "bf16", base, fused)], (1, 3))
    lines = table.splitlines()
    assert lines[0].startswith("| case | mode | status | loss@1 | loss@3 |")
    assert len(lines) == 4 and not failures
    cells = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert cells[1] == "fused" and cells[4] == "8.00400" and cells[6].startswith("PASS")
    assert float(cells[9]) == pytest.approx(40.3 / 50.3, abs=1e-3)
    bad = _res("fused", [10.0], status="OOM")
    _, failures = cases.make_table([("x", "bf16", base, bad)])
    assert failures and failures[0][1] == "n/a"


def test_noise_verdict():
    base = _res("baseline", [10.0, 9.0, 8.0])
    fused = _res("fused", [10.0, 9.0, 8.016])  # 2e-3 > 1e-3
    base2 = _res("baseline2", [10.0, 9.0, 8.010])  # noise 1.25e-3
    assert cases.parity(base, fused, "bf16")[0] == "FAIL"
    assert cases.parity(base, fused, "bf16", base2)[0] == "NOISE"
    assert cases.parity(base, _res("fused", [10.0, 9.0, 8.03]), "bf16", base2)[0] == "FAIL"
    table, failures = cases.make_table([("fsdp2", "bf16", base, fused, base2)], (1, 3))
    assert "| baseline2 | ok |" in table and "run-to-run noise" in table and "NOISE (1e-03, bf16)" in table
    assert failures[0][1] == "NOISE"


def test_run_order_alternates():
    assert cases.run_order(1, False) == [("baseline", 0), ("fused", 0)]
    assert cases.run_order(4, True) == [("baseline", 0), ("fused", 0), ("baseline2", 0), ("fused", 1), ("baseline", 1),
                                      ("baseline", 2), ("fused", 2), ("fused", 3), ("baseline", 3)]


def test_pairs_table():
    runs = [(0, _res("baseline", [1, 1, 1], tps=(0, 100, 100)), _res("fused", [1, 1, 1], tps=(0, 90, 90))),
            (1, _res("baseline", [1, 1, 1], tps=(0, 80, 80)), _res("fused", [1, 1, 1], tps=(0, 88, 88))),
            (2, _res("baseline", [1, 1, 1], tps=(0, 100, 100)), _res("fused", [1], status="OOM"))]
    lines = cases.pairs_table([("tp2_cp2", runs)]).splitlines()
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in lines[2:]]
    assert rows[0] == ["tp2_cp2", "0", "baseline", "100", "90", "0.900"]
    assert rows[1] == ["", "1", "fused", "80", "88", "1.100"]
    assert rows[2][1:3] == ["2", "baseline"] and rows[2][5] == ""  # a failed run gives no ratio
    assert rows[3] == ["", "median of 2", "", "", "", "1.000 (0.900-1.100)"]


def _helpers(*functions) -> str:
    """The fake launchers' helpers from this file, as source (the launcher is a script of its own)."""
    colors = f"RED, GREEN, ORANGE, TURQ, BLUE, CYAN, MAGENTA, RESET = {(RED, GREEN, ORANGE, TURQ, BLUE, CYAN, MAGENTA, RESET)!r}"
    return "\n".join([colors, *(inspect.getsource(f) for f in functions)])


FAKE = textwrap.dedent('''\
    #!/usr/bin/env python3
    import os, sys
    {helpers}
    a = sys.argv[1:]
    steps = int(a[a.index("--training.steps") + 1])
    fused = "--fused_ce.enable" in a
    print("[rank0]:[titan] x - root - INFO - NGPU=%s config=%s args=%s" % (os.environ["NGPU"], os.environ["CONFIG_FILE"], a))
    if "--parallelism.context_parallel_degree" in a and fused:
        print("[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        sys.exit(1)
    seq = int(a[a.index("--training.seq_len") + 1]) if "--training.seq_len" in a else 8192
    if seq > (32768 if fused else 16384):
        print("torch.OutOfMemoryError: CUDA out of memory."); sys.exit(1)
    for s in range(1, steps + 1):
        loss = 12.0 - 0.1 * s + (1e-5 if fused else 0.0) + (1e-6 * s if "--job.dump_folder" in a and a[-1].endswith("baseline2") else 0.0)
        if "--parallelism.tensor_parallel_degree" in a and fused:
            loss += 0.01
        print(titan_line(s, loss, mem=30.0 if fused else 50.0, tps=1000.0 * s))
''')


@pytest.fixture
def fake_launcher(tmp_path):
    p = tmp_path / "fake_run_train.sh"
    p.write_text(FAKE.format(helpers=_helpers(titan_line)))
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def test_driver_with_fake_launcher(tmp_path, fake_launcher, capsys):
    rc = bench.main(["--launcher", str(fake_launcher), "--cases", "fsdp2,tp2,cp2,fsdp2_accum2", "--steps", "12",
                   "--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md"), "--timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 1  # tp2 parity fails
    text = (tmp_path / "R.md").read_text()
    assert "## End-to-end" in text and "| fsdp2 | baseline | ok |" in text
    assert "PASS (1e-03, bf16)" in text and "FAIL (1e-04, fp32)" in text
    assert "| cp2 | baseline | ok |" in text and "| fused | OOM |" in text
    assert "CUDA out of memory" in text  # failing run's last log lines shown
    assert (tmp_path / "out" / "fsdp2_fused.log").exists()
    log = (tmp_path / "out" / "fsdp2_accum2_baseline.log").read_text()
    assert "'--training.global_batch_size', '8'" in log and "'--debug.seed', '42'" in log
    assert out.rstrip().splitlines()[-1].startswith("    ") or "|" in out  # table printed last


def test_driver_noise_ref(tmp_path, fake_launcher):
    rc = bench.main(["--launcher", str(fake_launcher), "--cases", "fsdp2", "--steps", "3", "--noise-ref",
                   "--out", str(tmp_path / "out"), "--dump-root", str(tmp_path / "dumps"), "--no-append"])
    assert rc == 0
    log = (tmp_path / "out" / "fsdp2_baseline2.log").read_text()
    assert str(tmp_path / "dumps" / "fsdp2_baseline2") in log


def test_driver_pairs(tmp_path, fake_launcher, capsys):
    rc = bench.main(["--launcher", str(fake_launcher), "--cases", "fsdp2", "--steps", "3", "--pairs", "3",
                   "--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md")])
    assert rc == 0
    logs = sorted((tmp_path / "out").glob("*.log"), key=lambda f: f.stat().st_mtime_ns)
    assert [f.stem for f in logs] == ["fsdp2_baseline", "fsdp2_fused", "fsdp2_fused_p1", "fsdp2_baseline_p1",
                                      "fsdp2_baseline_p2", "fsdp2_fused_p2"]
    text = (tmp_path / "R.md").read_text()
    assert "| fsdp2 | 0 | baseline |" in text and "| | median of 3 | | | | 1.000 (1.000-1.000) |" in text
    assert text.rstrip().splitlines()[-1].startswith("|  | fused | ok |")  # the parity table stays last
    with pytest.raises(SystemExit):
        bench.main(["--pairs", "0", "--dry-run"])
    assert "--pairs must be >= 1" in capsys.readouterr().err


def test_max_seq_with_fake_launcher(tmp_path, fake_launcher):
    rc = bench.main(["--launcher", str(fake_launcher), "--max-seq", "--seq-max", "131072",
                   "--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md"), "--timeout", "60"])
    assert rc == 0
    text = (tmp_path / "R.md").read_text()
    assert "| baseline | 16384 | 32768 (OOM) |" in text
    assert "| fused | 32768 | 65536 (OOM) |" in text


def test_timeout_kills_run(tmp_path):
    p = tmp_path / "slow.sh"
    p.write_text("#!/bin/sh\necho started\nsleep 60\n")
    p.chmod(0o755)
    rc = bench.main(["--launcher", str(p), "--cases", "fsdp2", "--steps", "2", "--timeout", "1",
                   "--out", str(tmp_path / "o"), "--no-append"])
    assert rc == 2


# ---------------------------------------------------------------- 4-GPU cases
DEGREES = {
    "--parallelism.data_parallel_replicate_degree": "dp_replicate",
    "--parallelism.data_parallel_shard_degree": "dp_shard",
    "--parallelism.tensor_parallel_degree": "tp",
    "--parallelism.context_parallel_degree": "cp",
}
MULTI4 = {  # case -> the degrees its command line must set
    "fsdp2_tp2": {"dp_shard": 2, "tp": 2},
    "fsdp2_cp2": {"dp_shard": 2, "cp": 2},
    "tp2_cp2": {"dp_shard": 1, "tp": 2, "cp": 2},
    "hsdp": {"dp_replicate": 2, "dp_shard": 2},
}


def _degrees(args):
    out = {}
    for flag, name in DEGREES.items():
        if flag in args:
            assert args.count(flag) == 1, f"{flag} given twice: {args}"
            out[name] = int(args[args.index(flag) + 1])
    return out


@pytest.mark.parametrize("case", list(cases.CASES))
def test_case_degrees_fill_the_gpus(case):
    """Every case that names degrees names all the non-trivial ones: their product is its NGPU
    (debug/1B configs leave dp_shard = -1, which torchtitan would otherwise stretch over the rest)."""
    ngpu, args, prec = cases.CASES[case]
    assert prec in cases.TOL
    d = _degrees(args)
    if ngpu > 1:
        assert d, case
        prod = 1
        for v in d.values():
            prod *= v
        assert prod == ngpu, f"{case}: degrees {d} do not multiply to NGPU={ngpu}"


def test_multi4_cases_command_lines(capsys, tmp_path):
    assert cases.MULTI4_CASES.split(",") == list(MULTI4)
    rc = bench.main(["--cases", cases.MULTI4_CASES, "--steps", "20", "--dry-run", "--out", str(tmp_path)])
    assert rc == 2  # dry run: no parity can be checked
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[e2e] ") and ": NGPU=" in l]
    assert len(lines) == 2 * len(MULTI4)
    for case, want in MULTI4.items():
        for mode in ("baseline", "fused"):
            (line,) = [l for l in lines if l.startswith(f"[e2e] {case}/{mode}: ")]
            head, cmd = line.split(" ./run_train.sh ", 1)
            assert "NGPU=4 CONFIG_FILE=train_configs/llama3_1b.toml" in head
            args = cmd.split()
            assert _degrees(args) == want, (case, args)
            assert args[args.index("--training.steps") + 1] == "20"
            # the 20 steps replay the first 20 learning rates of the config's 1000-step schedule
            assert args[args.index("--lr_scheduler.total_steps") + 1] == "1000"
            assert ("--fused_ce.enable" in args) == (mode == "fused")
            assert args[args.index("--job.dump_folder") + 1] == str(tmp_path / f"{case}_{mode}")
            assert "--parallelism.pipeline_parallel_degree" not in args
    assert not (tmp_path / "fsdp2_tp2_baseline.log").exists()  # nothing ran


def test_gpu_run_multi4_mode():
    """gpu_run.sh multi4 runs exactly cases.MULTI4_CASES, 20 steps, and the other modes are still there."""
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    body = script.split("\nmulti4)\n", 1)[1].split("\n    ;;\n", 1)[0]
    assert f'--cases "${{E2E_CASES:-{cases.MULTI4_CASES}}}"' in body
    assert '--steps "${E2E_STEPS:-20}"' in body and "python3 -m benchmarks.e2e.bench" in body
    for mode in ("kernel", "multi", "e2e", "maxseq", "multi4"):
        assert f"\n{mode})\n" in script, mode
    assert "kernel|multi|e2e|maxseq|multi4" in script
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_run.sh")]).returncode == 0


@pytest.mark.slow  # two torchtitan jobs of the debug model on CPU (~25 s)
def test_gpu_run_brings_the_run_logs_back_as_one_archive(tmp_path):
    """The device returns few files from $OUT: gpu_run.sh packs each per-run folder into
    run_logs.tgz and leaves only the step logs, the results log and the archive."""
    import tarfile
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="120", NO_APPEND="1", E2E_STEPS="2",
               E2E_TIMEOUT="60", SEARCH_ARGS="--caps 40 --search-compile off --search-batches 1 "
               "--config train_configs/debug_model.toml",
               E2E_ARGS=f"--dump-root {tmp_path / 'dumps'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "search"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == [
        "e2e_search.log", "results.md", "run_logs.tgz", "setup.log"]
    with tarfile.open(out / "run_logs.tgz") as tar:
        names = tar.getnames()
    assert {"e2e_search/cap40_eager_ac-none_lb1_baseline.log",
            "e2e_search/cap40_eager_ac-none_lb1_fused.log"} <= set(names), names


# ---------------------------------------------------------------- search mode
def fake_memory(ac, lb, compiled, fused):
    """GiB a fake run needs: activations by AC mode, plus logits (baseline only) per sample."""
    per_sample = {"none": 12.0, "selective": 7.0, "full": 3.0}[ac] * (0.75 if compiled else 1.0)
    return 10.0 + lb * (per_sample + (0.0 if fused else 6.0))


def fake_tps(ac, lb, compiled, fused):
    return 1000.0 * lb ** 0.5 * {"none": 1.0, "selective": 0.9, "full": 0.7}[ac] * (1.2 if compiled else 1.0)


FAKE_SEARCH = textwrap.dedent('''\
    #!/usr/bin/env python3
    import os, sys
    {helpers}
    a = sys.argv[1:]
    assert os.environ["TRAIN_FILE"] == "benchmarks.e2e.memory_cap", os.environ.get("TRAIN_FILE")
    cap = float(os.environ["MEMORY_CAP_GIB"])
    setting = (a[a.index("--activation_checkpoint.mode") + 1], int(a[a.index("--training.local_batch_size") + 1]),
               "--compile.enable" in a, "--fused_ce.enable" in a)
    print("[rank0]: fake run cap=%s setting=%s" % (cap, setting))
    mem = fake_memory(*setting)
    if mem > 0.9 * cap:  # as torchtitan warns after the allocator freed its cache to retry
        print("[rank0]:[titan] WARNING - 3 CUDA memory allocation retries.")
    if mem > cap:
        print("[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"); sys.exit(1)
    for s in range(1, int(a[a.index("--training.steps") + 1]) + 1):
        loss = 12.0 - 0.1 * s + (2e-5 if setting[3] else 0.0) + 0.01 * setting[1]
        print(titan_line(s, loss, mem=mem, tps=fake_tps(*setting) * (0.1 if s == 1 else 1.0), mfu=12.5))
''')


@pytest.fixture
def fake_search_launcher(tmp_path):
    p = tmp_path / "fake_search.sh"
    p.write_text(FAKE_SEARCH.format(helpers=_helpers(fake_memory, fake_tps, titan_line)))
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def _touches_cap(mem, cap):
    """The fake allocator retries (torchtitan warns) when a run comes within 10% of its cap."""
    return mem > 0.9 * cap


def _expected_search(caps, fused, batches=(1, 2, 4, 8, 16, 32, 64)):
    """cap -> (settings run there, settings reused from a smaller cap, best (tps, setting)).

    The rules, restated: caps smallest first; each (compile, AC) pair up to its first OOM; a
    heavier AC only above the largest batch a lighter one fit; a run that fit a smaller cap
    without touching it is reused, not repeated."""
    reusable, out = set(), {}
    for cap in sorted(caps):
        made, reused, fits = [], [], []
        for compiled in (False, True):
            lighter = 0
            for ac in ("none", "selective", "full"):
                largest = lighter
                for lb in (b for b in batches if b > lighter):
                    key, mem = (compiled, ac, lb), fake_memory(ac, lb, compiled, fused)
                    if key in reusable:
                        reused.append(key)
                    else:
                        made.append(key)
                        if mem <= cap and not _touches_cap(mem, cap):
                            reusable.add(key)
                    if mem > cap:
                        break
                    fits.append((fake_tps(ac, lb, compiled, fused), compiled, ac, lb))
                    largest = lb
                lighter = largest
        out[cap] = (made, reused, max(fits))
    return out


def test_search_with_fake_launcher(tmp_path, fake_search_launcher):
    out = tmp_path / "out"
    rc = bench.main(["--launcher", str(fake_search_launcher), "--search", "--caps", "80,40", "--steps", "3",
                   "--out", str(out), "--results", str(tmp_path / "R.md"), "--timeout", "60"])
    assert rc == 0
    text = (tmp_path / "R.md").read_text()
    assert "## Fastest setting under a memory cap" in text and "- commit: " in text and "- command: " in text
    best_rows = text.split("Best per cap and mode:", 1)[1].strip().splitlines()
    assert text.rstrip().endswith(best_rows[-1])  # the best table is printed last
    best = {(c[0], c[1]): c for c in ([x.strip() for x in r.split("|")[1:-1]] for r in best_rows[2:])}
    all_rows = [[x.strip() for x in r.split("|")[1:-1]]
                for r in text.split("All runs:", 1)[1].split("Best per cap", 1)[0].strip().splitlines()[2:]]
    logs = {f.stem for f in out.glob("*.log")}
    for mode, fused in (("baseline", False), ("fused", True)):
        expected = _expected_search((80.0, 40.0), fused)
        assert expected[80.0][1], "the fake must exercise the reuse"
        assert any(_touches_cap(fake_memory(a, b, c, fused), 40.0) and fake_memory(a, b, c, fused) <= 40.0
                   for c, a, b in expected[40.0][0]), "the fake must exercise a run that touched its cap"
        for cap in (40.0, 80.0):
            made, reused, _ = expected[cap]
            # exactly the runs the rules leave, each under its cap; the reused ones are said to be
            want = {f"cap{cap:g}_{'compile' if c else 'eager'}_ac-{a}_lb{b}_{mode}" for c, a, b in made}
            assert {l for l in logs if l.startswith(f"cap{cap:g}_") and l.endswith(mode)} == want
            said = {(r[2] == "on", r[3], int(r[4])) for r in all_rows
                    if r[0] == f"{cap:g}" and r[1] == mode and r[6] == "cap 40's (never reached it)"}
            assert said == set(reused)
    for cap in (80.0, 40.0):
        base_tps = None
        for mode, fused in (("baseline", False), ("fused", True)):
            tps, compiled, ac, lb = _expected_search((80.0, 40.0), fused)[cap][2]
            row = best[f"{cap:g}", mode]
            assert row[2] == f"{'compile' if compiled else 'eager'}, AC {ac}, local batch {lb}"
            assert row[3] == f"{tps:,.0f}" and float(row[4]) == pytest.approx(fake_memory(ac, lb, compiled, fused))
            assert row[5] == "12.50"
            base_tps = base_tps or tps
            assert float(row[6]) == pytest.approx(tps / base_tps, abs=1e-3)
        # the fused best does not fit the baseline at this cap: said, not compared
        assert best[f"{cap:g}", "fused"][7].startswith("baseline: OOM")
    # the fused head's freed memory buys a larger batch, hence more tps
    assert float(best["40", "fused"][6]) > 1.0 and float(best["80", "fused"][6]) > 1.0
    log = (out / "cap40_eager_ac-none_lb1_baseline.log").read_text()
    assert "TRAIN_FILE=benchmarks.e2e.memory_cap MEMORY_CAP_GIB=40" in log


def test_search_refuses_local_batch_and_unknown_ac(tmp_path):
    with pytest.raises(SystemExit, match="local batch"):
        bench.main(["--search", "--local-batch", "4", "--dry-run", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.main(["--search", "--search-ac", "some", "--dry-run", "--out", str(tmp_path)])


def test_memory_cap_hook(tmp_path, monkeypatch):
    """The hook caps the rank's device at the fraction cap / total, then runs the trainer module."""
    import torch

    from benchmarks.e2e import memory_cap

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 140 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert memory_cap.apply_cap(80, 3) == pytest.approx(80 / 140) and calls == [(pytest.approx(80 / 140), 3)]
    assert memory_cap.apply_cap(200, 0) == 1.0  # a cap above the card: the whole card
    (tmp_path / "fake_trainer.py").write_text("import sys\nprint('trainer', __name__, sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e.memory_cap", "--job.x", "1"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "MEMORY_CAP_TRAIN_FILE": "fake_trainer",
                               "MEMORY_CAP_GIB": "40", "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trainer __main__ ['--job.x', '1']" in proc.stdout and "not applied" in proc.stdout


def test_search_skips_a_run_that_would_end_past_the_budget(monkeypatch):
    """A run starts only if the longest run so far would still end before the deadline: the
    tables must be printed within the budget (a device call's limit), not cut off with it."""
    import types

    from benchmarks.e2e import search as e2e_search

    clock = [1000.0]
    monkeypatch.setattr(e2e_search.time, "time", lambda: clock[0])

    def fake_run_job(case, mode, ngpu, a, opts, steps, env_extra=None):
        clock[0] += 100.0  # every run takes 100 s
        return e2e_runs.RunResult(case, mode, a, "", status="ok", seconds=100.0, extra={"alloc_retries": 0})

    monkeypatch.setattr(e2e_search, "run_job", fake_run_job)
    monkeypatch.setattr(e2e_search, "common_args", lambda opts, steps: [])
    opts = types.SimpleNamespace(launcher="x", steps=3, fused_flag="", search_ngpu=1)
    longest = [0.0]
    runs = e2e_search.search_mode("baseline", 40.0, opts, [True], ["none"], [1, 2, 4], 1000.0 + 250.0, {}, longest)
    # runs at 1000 (ends 1100) and 1100 (ends 1200); one at 1200 would end at 1300 > 1250
    assert [r.status for _, r in runs] == ["ok", "ok", "skipped (budget)"]
    assert longest == [100.0]


def test_case_placeholders_are_the_documented_ones():
    """Every {placeholder} in a case's arguments is documented above CASES and filled in by
    resolve_case, and no documented one is missing from the cases."""
    import re

    source = (ROOT / "benchmarks" / "e2e" / "cases.py").read_text()
    documented = set(re.findall(r"^# \{(\w+)\}:", source, re.M))
    used = {m for _, args, _ in cases.CASES.values() for a in args for m in re.findall(r"\{(\w+)\}", a)}
    assert documented == used
    opts = argparse.Namespace(local_batch=3, config_local_batch=2)
    for name in cases.CASES:
        assert not any("{" in a for a in cases.resolve_case(name, opts)[2]), name
    assert cases.resolve_case("fsdp2_accum2", opts)[2][-1] == "12"  # 2 steps x local batch 3 x dp 2


def test_failure_details_show_each_failed_runs_last_lines():
    ok, failed = _res("baseline", [1, 1]), _res("fused", [1], status="OOM")
    failed.log_path, failed.tail = str(ROOT / "f.log"), ["a", "CUDA out of memory"]
    text = cases.failure_details([("fsdp2", "n/a", ok, failed)])
    assert text.splitlines() == ["fsdp2/fused: OOM (log f.log)", "    a", "    CUDA out of memory"]
