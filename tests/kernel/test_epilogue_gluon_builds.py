"""The Hopper GEMM (fused_loss/epilogue_gluon.py) built for sm_90a on any machine: Triton's
compiler and the ptxas its wheel ships need no GPU, so the CPU suite catches what only a GPU
run would otherwise show: a kernel that does not build, does not fit a multiprocessor's shared
memory, spills registers, or has its wgmmas serialized by ptxas (warnings C75xx: the tensor
cores waiting on each MMA, the GEMM 1.6-3x slower; benchmarks/NOTES.md, attempts 27-34). It
proves the build, not the results: the GPU tests prove those.

The suite runs Triton's interpreter (conftest), whose functions cannot be compiled, so the
builds run in one subprocess without it: this file, run as a script, prints them as JSON."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fused_loss import epilogue_gluon as eg

ROOT = Path(__file__).resolve().parents[2]
SHARED_MEMORY_BYTES = 232448  # an H100's / H200's per-block opt-in maximum (227 KB)
# (dtype, options, TMA store of E, schedule): the specializations the op launches, then the
# schedules the GPU is to time against its own, plain and with the most options (their
# epilogue is the same code; the consumers' registers and barriers are not)
CASES = [
    ("bf16", (), True, eg.SCHEDULE),
    ("fp16", (), True, eg.SCHEDULE),
    ("bf16", (), False, eg.SCHEDULE),  # V_local not a multiple of 8: E by plain stores
    ("bf16", ("bias", "softcap"), True, eg.SCHEDULE),
    ("bf16", ("smoothing",), True, eg.SCHEDULE),
    ("bf16", ("token_stats",), True, eg.SCHEDULE),
] + [("bf16", options, True, s) for s in eg.CANDIDATES for options in ((), ("bias", "softcap"))]


def _case_id(case) -> str:
    dtype, options, tma_store, schedule = case
    return "-".join([dtype, ",".join(options) or "plain", "tma" if tma_store else "stores",
                     schedule.name])


def _build(dtype: str, options: tuple, tma_store: bool, schedule: eg.Schedule, tmp: Path) -> dict:
    """One specialization compiled for sm_90a: its shared memory and ptxas -v's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    bm, bn, bk = eg.BM.value, eg.BN.value, eg.BK.value
    e_block = [eg.EPI_ROWS.value, bn] if tma_store else [1, 8]  # as epilogue_gluon.logits

    def desc(name, block, layout_dtype):
        layout = gl.NVMMASharedLayout.get_default_for(block, layout_dtype)
        return f"tensordesc<{name}[{block[0]}, {block[1]}],{layout!r}>"

    sig = {"h_desc": desc(dtype, [bm, bk], gl_dtype), "w_desc": desc(dtype, [bn, bk], gl_dtype),
           "e_desc": desc("fp16", e_block, gl.float16), "e_ptr": "*fp16", "stride_e": "i32",
           "part_ptr": "*fp32", "target_ptr": "*fp32", "bias_ptr": f"*{dtype}",
           "labels_ptr": "*i64", "M": "i32", "V": "i32", "K": "i32", "vocab_start": "i32",
           "cap": "fp32", "HAS_BIAS": "constexpr", "HAS_CAP": "constexpr",
           "NEED_SUM": "constexpr", "TOKEN_STATS": "constexpr", "P": "constexpr",
           "TMA_STORE": "constexpr", "CONSUMERS": "constexpr", "CHAIN": "constexpr",
           "SKEW": "constexpr"}
    p = 5 if "token_stats" in options else (3 if "smoothing" in options else 2)
    constants = {"HAS_BIAS": "bias" in options, "HAS_CAP": "softcap" in options,
                 "NEED_SUM": "smoothing" in options, "TOKEN_STATS": "token_stats" in options,
                 "P": p, "TMA_STORE": tma_store, "CONSUMERS": schedule.consumers,
                 "CHAIN": schedule.chain, "SKEW": schedule.skew}
    names = list(sig)
    src = GluonASTSource(eg._logits_kernel, sig,
                         {(names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(
        num_warps=eg._CONSUMER_WARPS.value // schedule.consumers, maxnreg=eg._MAXNREG))
    ptx = tmp / f"{_case_id((dtype, options, tma_store, schedule))}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run(
        [get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
        capture_output=True, text=True, check=True)
    return {"shared": kernel.metadata.shared, "ptxas": report.stdout + report.stderr}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    tmp = tmp_path_factory.mktemp("sm90")
    run = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_builds_for_hopper_in_shared_memory_without_serialized_mmas(builds, case):
    got = builds[_case_id(case)]
    assert got["shared"] <= SHARED_MEMORY_BYTES, (
        f"{got['shared']} bytes of shared memory: the ring's slots and the staging tile must fit")
    serialized = re.findall(r"\(C75\d\d\)[^\n]*", got["ptxas"])
    assert not serialized, serialized
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", got["ptxas"])]
    assert spills, got["ptxas"]  # ptxas -v always reports them
    # the options' epilogue temporaries may spill a few words; the plain kernel none
    assert sum(spills) <= (64 if case[1] else 0), got["ptxas"]


@pytest.mark.parametrize("schedule, field", [
    (eg.Schedule(consumers=3), "Schedule.consumers"),
    (eg.Schedule(chain=0), "Schedule.chain"),
    (eg.Schedule(chain=eg.STAGES.value // 2 + 1), "Schedule.chain"),  # a run past the ring
    (eg.Schedule(consumers=1, skew=1), "Schedule.skew"),
    (eg.Schedule(consumers=2, chain=1, skew=2), "Schedule.skew"),
])
def test_a_schedule_the_kernel_cannot_run_is_refused_by_name(schedule, field):
    with pytest.raises(ValueError, match=field):
        schedule.check()


def test_the_schedules_are_named_as_the_benchmark_takes_them():
    for schedule in (eg.SCHEDULE, *eg.CANDIDATES):
        assert eg.Schedule.from_name(schedule.name) == schedule.check()
    assert eg.Schedule.from_name("2x1skew1") == eg.Schedule(consumers=2, chain=1, skew=1)
    for bad in ("two", "2x2skew"):
        with pytest.raises(ValueError, match="CONSUMERSxCHAIN"):
            eg.Schedule.from_name(bad)
    with pytest.raises(ValueError, match="Schedule.skew"):
        eg.Schedule.from_name("1x2skew1")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(json.dumps({_case_id(c): _build(*c, out) for c in CASES}))
