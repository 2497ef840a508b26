"""A refused job ends with its one message and exit code 2.

torchrun used to bury the trainer's refusal under ~30 lines of ChildFailedError and exit 1.
run_train.sh now launches through parallel/launch.py: one process, two processes and two
"nodes" (c10d rendezvous on localhost, each node's launcher checking the job before it) all
end with the message as the last line of stderr and exit code 2; other failures keep
torchrun's report.
"""

import os
import socket
import subprocess
import time
import uuid

import pytest

from conftest import ROOT, run_train

pytestmark = pytest.mark.slow  # torchrun jobs

PP_MESSAGE = "fused_ce.enable=true does not support pipeline parallelism"
SMOOTHING_MESSAGE = "fused_ce.label_smoothing must be in [0, 1), got 2"
MODEL_MESSAGE = "model.name='no_such_model' is not a model torchtitan knows; the fused head serves llama3"


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def assert_refused(proc, message: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert _last_line(proc.stderr).startswith(message), proc.stderr[-4000:]
    assert "ChildFailedError" not in output and "Traceback" not in output, output[-4000:]
    assert output.count(_last_line(proc.stderr)) == 1  # said once, last: not also in the rank's log


@pytest.mark.parametrize(
    "ngpu, args, message",
    [
        ("1", ("--fused_ce.enable", "--fused_ce.label_smoothing", "2"), SMOOTHING_MESSAGE),
        ("2", ("--fused_ce.enable", "--parallelism.pipeline_parallel_degree", "2"), PP_MESSAGE),
        ("1", ("--model.name", "no_such_model"), MODEL_MESSAGE),  # the baseline's start-up checks too
    ],
    ids=["one-process", "two-processes", "baseline"],
)
def test_refused_job_ends_with_its_message_and_exit_2(tmp_path, ngpu, args, message):
    proc, _ = run_train(tmp_path, *args, env={"NGPU": ngpu}, check=False)
    assert_refused(proc, message)


def _multinode_env(**extra) -> dict:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return {**os.environ, "NNODES": "2", "NGPU": "1", "RDZV_ENDPOINT": f"localhost:{port}",
            "RDZV_ID": uuid.uuid4().hex, **extra}


def _refused_node(tmp_path, env):
    return subprocess.Popen(
        ["./run_train.sh", "--job.dump_folder", str(tmp_path), "--fused_ce.enable", "--fused_ce.label_smoothing", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _assert_node_refused(node, timeout: float) -> None:
    try:
        stdout, stderr = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.kill()  # not left waiting for its rendezvous after the test
        raise
    assert_refused(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr), SMOOTHING_MESSAGE)


def test_refused_multinode_job_ends_with_its_message_and_exit_2(tmp_path):
    # CI's failure, made certain: node 0 starts first, so its launcher hosts torchrun's store, and
    # node 1's ranks are still starting (sitecustomize sleeps) when node 0's have refused. Had the
    # ranks refused, node 0's launcher would exit with the store and node 1's would end with
    # RendezvousConnectionError, exit 1; each node's launcher refuses the job before the rendezvous.
    slow = tmp_path / "slow_ranks"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif 'LOCAL_RANK' in os.environ:\n    time.sleep(30)\n")
    env = _multinode_env()
    node0 = _refused_node(tmp_path, {**env, "NODE_RANK": "0"})
    time.sleep(2)
    node1 = _refused_node(tmp_path, {**env, "NODE_RANK": "1", "PYTHONPATH": str(slow)})
    for node in (node0, node1):
        _assert_node_refused(node, timeout=300)


def test_refused_node_does_not_wait_for_its_peers(tmp_path):
    # Node 1 of 2, and node 0 never starts: the refusal comes at once, not after the rendezvous's
    # join timeout (600 s).
    _assert_node_refused(_refused_node(tmp_path, _multinode_env(NODE_RANK="1")), timeout=90)


def test_unknown_option_exits_2_without_launcher_traceback(tmp_path):
    proc, _ = run_train(tmp_path, "--fused_ce.enabel", check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Unrecognized options: --fused_ce.enabel" in proc.stderr
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


def test_other_failures_keep_torchruns_report(tmp_path):
    # torchtitan's own check of the layout (tp=3 does not divide a world of 1), past the start-up checks
    proc, _ = run_train(tmp_path, "--parallelism.tensor_parallel_degree", "3", "--training.steps", "1", check=False)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "ChildFailedError" in proc.stderr
