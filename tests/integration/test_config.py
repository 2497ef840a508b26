"""`[fused_ce]` parsing (TOML + CLI through torchtitan's ConfigManager) and start-up checks."""


import pytest
import torch
from conftest import ROOT, run_train
from torchtitan.config import ConfigManager

from parallel.train import check_job, check_labels, JobRefused

DEBUG = str(ROOT / "train_configs" / "debug_model.toml")
CUSTOM = "--job.custom_config_module=parallel.config"


def parse(*args: str, toml: str = DEBUG):
    return ConfigManager().parse_args([CUSTOM, "--job.config_file", toml, *args])


def write_toml(tmp_path, fused_ce: str) -> str:
    """The debug job with its [fused_ce] section replaced by `fused_ce`."""
    path = tmp_path / "job.toml"
    path.write_text(open(DEBUG).read().split("[fused_ce]")[0] + "[fused_ce]\n" + fused_ce)
    return str(path)


def test_defaults_from_toml():
    cfg = parse().fused_ce
    assert (cfg.enable, cfg.backend, cfg.chunk_size, cfg.chunk_budget_mib) == (False, "auto", 0, 1024)
    assert (cfg.z_loss, cfg.label_smoothing, cfg.logit_softcap, cfg.check_labels) == (0.0, 0.0, 0.0, True)


def test_toml_values(tmp_path):
    toml = write_toml(tmp_path, 'enable = true\nbackend = "torch"\nz_loss = 1e-4\nlogit_softcap = 30.0\n')
    cfg = parse(toml=toml).fused_ce
    assert (cfg.enable, cfg.backend, cfg.z_loss, cfg.logit_softcap) == (True, "torch", 1e-4, 30.0)
    assert cfg.chunk_budget_mib == 1024  # keys left out keep their defaults


def test_cli_overrides_toml():
    cfg = parse("--fused_ce.enable", "--fused_ce.z_loss", "1e-4", "--fused_ce.chunk_size", "512").fused_ce
    assert cfg.enable and cfg.z_loss == 1e-4 and cfg.chunk_size == 512
    assert parse("--fused_ce.enable", "--fused_ce.no-enable").fused_ce.enable is False
    assert parse("--fused_ce.no-check_labels").fused_ce.check_labels is False
    assert parse().fused_ce.weight_grad_fp32 is True
    assert parse("--fused_ce.no-weight_grad_fp32").fused_ce.weight_grad_fp32 is False


def test_typo_in_toml_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="z_los"):
        parse(toml=write_toml(tmp_path, "z_los = 1e-4\n"))


def test_typo_on_cli_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--fused_ce.z_los", "1e-4")
    assert e.value.code != 0
    assert "z_los" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--fused_ce.backend", "cuda"), "fused_ce.backend must be one of auto, triton, torch; got 'cuda'"),
        (("--fused_ce.z_loss", "-1"), "fused_ce.z_loss must be >= 0, got -1"),
        (("--fused_ce.label_smoothing", "1.0"), "fused_ce.label_smoothing must be in [0, 1), got 1"),
        (("--fused_ce.logit_softcap", "-5"), "fused_ce.logit_softcap must be >= 0"),
        (("--fused_ce.chunk_size", "-1"), "fused_ce.chunk_size must be >= 0"),
        (("--fused_ce.chunk_budget_mib", "0"), "fused_ce.chunk_budget_mib must be a positive number of MiB, got 0"),
        (("--fused_ce.chunk_budget_mib", "-5"), "fused_ce.chunk_budget_mib must be a positive number of MiB, got -5"),
        (("--parallelism.pipeline_parallel_degree", "2"), "parallelism.pipeline_parallel_degree=2"),
    ],
)
def test_check_job_refuses(args, message):
    with pytest.raises(JobRefused) as e:
        check_job(parse("--fused_ce.enable", *args))
    assert message in str(e.value)


def test_check_job_ignores_fused_settings_when_off():
    check_job(parse("--parallelism.pipeline_parallel_degree", "2"))


def test_budget_check_uses_the_local_vocab():
    # 128256 fp32 entries need 0.49 MiB: 1 MiB is enough.
    check_job(parse("--fused_ce.enable", "--model.flavor", "1B", "--fused_ce.chunk_budget_mib", "1"))


def test_triton_without_cuda_is_refused_at_start_up(monkeypatch):
    # the kernel's own backend rule, at start-up instead of a traceback at step 1
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(JobRefused, match=r"^fused_ce\.backend='triton' needs CUDA"):
        check_job(parse("--fused_ce.enable", "--fused_ce.backend", "triton"))
    check_job(parse("--fused_ce.enable", "--fused_ce.backend", "torch"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_job(parse("--fused_ce.enable", "--fused_ce.backend", "triton"))


def test_config_checks_with_the_kernels_rules():
    from fused_loss import DEFAULT_CHUNK_BUDGET_BYTES, plan_chunks
    from parallel.config import kernel_options, validate

    cfg = parse("--fused_ce.enable").fused_ce
    assert kernel_options(cfg)["chunk_budget_bytes"] == DEFAULT_CHUNK_BUDGET_BYTES  # one default
    assert (kernel_options(cfg)["logit_softcap"], kernel_options(cfg)["chunk_size"]) == (None, None)
    # the budget rule at its edge: 1 MiB holds one fp32 row of 262144 entries, not of 262145,
    # in the config as in the kernel
    cfg = parse("--fused_ce.enable", "--fused_ce.chunk_budget_mib", "1").fused_ce
    validate(cfg, vocab_size=2 * 262144, tp_degree=2)
    assert plan_chunks(1, 8, 262144, 4, chunk_budget_bytes=2**20).rows == 1
    with pytest.raises(ValueError, match=r"chunk_budget_mib=1 is too small for one row: "
                                         r"chunk_budget_bytes=1048576 is smaller"):
        validate(cfg, vocab_size=2 * 262145, tp_degree=2)
    with pytest.raises(ValueError, match="chunk_budget_bytes=1048576 is smaller"):
        plan_chunks(1, 8, 262145, 4, chunk_budget_bytes=2**20)


def test_pp_refused_at_start_up(tmp_path):
    """The launched job exits non-zero within 30 s with one message, before any process group."""
    proc, seconds = run_train(
        tmp_path, "--fused_ce.enable", "--parallelism.pipeline_parallel_degree", "2", check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < 30, f"refusal took {seconds:.1f} s"
    # (30 s: the bound is "before the model is built"; a cold import of torch + torchtitan on a
    # busy machine once took 15.6 s)
    assert out.count("does not support pipeline parallelism") == 1, out[-3000:]
    assert "JobRefused" not in out  # a message, not a Python traceback from the trainer
    # Refused before Trainer.__init__ got anywhere: no device mesh, no process group.
    assert "Building device mesh" not in out and "Starting job" not in out


def test_check_labels_names_count_and_value():
    check_labels(torch.tensor([[0, 5, -100]]), vocab_size=6)
    with pytest.raises(ValueError, match=r"check_labels: labels: 2 value\(s\) outside \[0, 6\) .* e.g. 7"):
        check_labels(torch.tensor([[0, 7, 9, -100]]), vocab_size=6)


def test_budget_check_plans_with_the_kernel_librarys_vocab_slice(monkeypatch):
    """validate() asks fused_loss.plan.group_v_local for the slice every TP rank plans with (an
    uneven split of 11 rows over 2 ranks: 6), as the head's own plan does, not a copy of its rule."""
    from fused_loss import plan
    from parallel import config
    from parallel.config import FusedCE

    asked = []
    monkeypatch.setattr(config, "group_v_local", lambda *a: asked.append(a) or plan.group_v_local(*a))
    config.validate(FusedCE(enable=True, backend="torch"), vocab_size=11, tp_degree=2)
    assert asked == [(11, 11, 2)] and plan.group_v_local(11, 11, 2) == 6
