"""Training entry point: `python -m parallel.train` (run_train.sh's default TRAIN_FILE).

torchtitan's Trainer, plus: the project's train specs and datasets registered;
the `[fused_ce]` start-up check (before any process group, device or memory
exists); each batch's labels handed to the fused head before the forward; the
label range check on the CPU copy of each batch; the fused stats logged.
"""

import dataclasses
import logging
import os
import sys

from parallel import cpu_shims, patches, refusals

patches.apply()  # before torchtitan is imported: it binds the device type at import time

import torch  # noqa: E402
from torchtitan.config import TORCH_DTYPE_MAP  # noqa: E402
from torchtitan.components.loss import IGNORE_INDEX  # noqa: E402
from torchtitan.tools.logging import logger  # noqa: E402
from torchtitan.train import main, Trainer  # noqa: E402

from fused_loss import check_label_range, group_v_local, pick_backend, plan_chunks  # noqa: E402
from fused_loss.plan import LOGITS_PATHS, logits_path  # noqa: E402

from parallel import config, resume, tensorboard_run  # noqa: E402
from parallel.dump_folder import check_dump_folder  # noqa: E402
from parallel.embedded_data import resolve_data  # noqa: E402
from parallel.fused_head import FusedCELoss  # noqa: E402
from parallel.specs import JobRefused, model_args_of, PP_REFUSAL, served_model_args  # noqa: E402


def check_job(job_config) -> None:
    """Start-up checks, before anything is built: the model, tokenizer and data sets the job
    names (with either head), then `[fused_ce]`. JobRefused names the setting at fault; while
    the fused head is off, a warning names any other `[fused_ce]` setting, which then does nothing."""
    model_args_of(job_config.model.name, job_config.model.flavor)
    try:
        notes = resolve_data(job_config)
    except ValueError as e:
        raise JobRefused(str(e)) from None
    for note in notes:
        logger.info(note)
    cfg = job_config.fused_ce
    if not cfg.enable:
        ignored = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                   if f.name != "enable" and getattr(cfg, f.name) != f.default]
        if ignored:
            logger.warning(f"[fused_ce] enable is off, so {', '.join(ignored)} "
                           f"{'does' if len(ignored) == 1 else 'do'} nothing; "
                           "turn the fused head on with --fused_ce.enable")
        return
    pp = job_config.parallelism.pipeline_parallel_degree
    if pp > 1:
        raise JobRefused(PP_REFUSAL.format(degree=pp))
    model_args = served_model_args(job_config.model.name, job_config.model.flavor)
    try:
        config.validate(cfg, model_args.vocab_size, job_config.parallelism.tensor_parallel_degree)
    except ValueError as e:
        raise JobRefused(str(e)) from None


def check_start_up(job_config) -> None:
    """Every check a job passes before anything is built: check_job, then that its output can be
    written. The trainer runs it; on multi-node so does each node's launcher, before the rendezvous."""
    check_job(job_config)
    check_dump_folder(job_config)


def training_dtype(job_config, parallel_dims) -> torch.dtype:
    """What the blocks and the head compute in: FSDP casts to the mixed-precision dtype, one
    device autocasts to it, TP or PP without FSDP trains in fp32 (torchtitan's maybe_enable_amp)."""
    fp32 = not parallel_dims.fsdp_enabled and (parallel_dims.tp_enabled or parallel_dims.pp_enabled)
    return torch.float32 if fp32 else TORCH_DTYPE_MAP[job_config.training.mixed_precision_param]


def describe_job(job_config, parallel_dims, device: torch.device) -> str:
    """The start-up line of every run: device, communication backend, world and layout, dtype, seed."""
    world = parallel_dims.world_size
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    what = f"{torch.cuda.get_device_name(device)} GPU(s)" if device.type == "cuda" else f"{device.type} process(es)"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "no process group"
    layout = ", ".join(f"{name}={getattr(parallel_dims, name)}"
                       for name in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep"))
    seed = job_config.debug.seed
    return (f"Job: world size {world} = {world // per_node} node(s) x {per_node} {what}, {backend}; {layout}; "
            f"{str(training_dtype(job_config, parallel_dims)).removeprefix('torch.')}; "
            + (f"seed {seed}" if seed is not None else "no seed (debug.seed): runs are not reproducible"))


def cpu_precision_hint(job_config, parallel_dims, device: torch.device) -> str | None:
    """A CPU run in 16 bits runs its matmuls many times slower than in fp32: say why and what to use."""
    dtype = training_dtype(job_config, parallel_dims)
    if device.type != "cpu" or dtype == torch.float32:
        return None
    return (f"training in {str(dtype).removeprefix('torch.')} on the CPU: its 16-bit matmuls are many times "
            "slower than float32 ones; add --training.mixed_precision_param float32 (and a small "
            "--training.local_batch_size / --training.seq_len) for a CPU run")


HEAD_OFF = "[fused_ce] off: the model's own LM head and cross-entropy (--fused_ce.enable fuses them)"


def describe_head(job_config, head, parallel_dims) -> str:
    """The start-up line of a fused run: what the head will do, in the job's own terms."""
    cfg, training = job_config.fused_ce, job_config.training
    start, v_local, vocab = head.vocab_slice()
    dtype = training_dtype(job_config, parallel_dims)
    dtype_name = str(dtype).removeprefix("torch.")
    tokens = training.local_batch_size * training.seq_len // parallel_dims.cp
    options = config.kernel_options(cfg)
    # the op's own plan (fused_loss.plan_chunks), on the slice size every rank plans with
    v_plan = group_v_local(v_local, vocab, parallel_dims.tp if parallel_dims.tp_enabled else 1)
    chunks = plan_chunks(tokens, head.in_features, v_plan,
                         dtype.itemsize, weight_grad_fp32=cfg.weight_grad_fp32,
                         weight_is_fp32=dtype == torch.float32,
                         dh_fp32=False,  # the trainer announces 1 / global tokens (grad_scale)
                         chunk_size=options["chunk_size"],
                         chunk_budget_bytes=options["chunk_budget_bytes"])
    rows = chunks.rows
    plan = (f"chunk_size={cfg.chunk_size}" if cfg.chunk_size
            else f"chunk_budget_mib={cfg.chunk_budget_mib} of {dtype_name} logits")
    if not cfg.chunk_size and rows * v_plan * dtype.itemsize > options["chunk_budget_bytes"]:
        plan += ", a cap: larger chunks above it hold no more memory in all than capped chunks"
    if chunks.carry_fp32:
        dw = "carried across chunks in fp32"
    elif chunks.n_chunks > 1 and dtype != torch.float32:
        dw = f"carried across chunks in {dtype_name}"
    else:
        dw = f"in {dtype_name} (no carry: one chunk or fp32)"
    active = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.name in ("label_smoothing", "z_loss", "logit_softcap", "check_labels",
                            "fp32_statistics")
              and getattr(cfg, f.name) != f.default]
    backend = pick_backend(cfg.backend, head.weight.device.type)
    device = head.weight.device
    path = logits_path(backend, dtype.itemsize, head.in_features,
                       fp32_statistics=cfg.fp32_statistics, tma=device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9,
                       softcap_with_smoothing=bool(cfg.logit_softcap and cfg.label_smoothing))
    return (f"[fused_ce] on: backend {backend} ({path} path: {LOGITS_PATHS[path]}); "
            f"{chunks.n_chunks} chunk(s) of {rows} of {tokens} tokens per micro-batch ({plan}); "
            f"dW {dw}; vocab rows [{start}, {start + v_local}) of {vocab} on this rank"
            f"{f' (TP={parallel_dims.tp})' if parallel_dims.tp_enabled else ''}; "
            f"options: {', '.join(active) or 'none'}")


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    try:
        check_label_range(labels, vocab_size, IGNORE_INDEX)
    except ValueError as e:
        raise ValueError(
            f"fused_ce.check_labels: {e}: the tokenizer's vocabulary must fit in the model "
            f"flavor's vocab_size ({vocab_size})"
        ) from None


def _handing_labels_to(head, post_dataloading_process):
    """`post_dataloading_process` (the trainer's or the validator's) that also gives the
    batch's labels - after CP sharding, on the device - to the head the forward ends in."""

    def process(*args):
        inputs, labels, extra_inputs, extra_kwargs = post_dataloading_process(*args)
        head.expect_labels(labels)
        return inputs, labels, extra_inputs, extra_kwargs

    return process


class FusedCETrainer(Trainer):
    def __init__(self, job_config):
        tensorboard_run.install()
        check_start_up(job_config)
        super().__init__(job_config)
        logger.info(describe_job(job_config, self.parallel_dims, self.device))
        if hint := cpu_precision_hint(job_config, self.parallel_dims, self.device):
            logger.warning(hint)
        self.fused_head = None
        if isinstance(self.loss_fn, FusedCELoss):
            self.fused_head = head = self.model_parts[0].output
            self.post_dataloading_process = _handing_labels_to(head, self.post_dataloading_process)
            validator = getattr(self, "validator", None)
            if validator is not None:
                validator.post_dataloading_process = _handing_labels_to(
                    head, validator.post_dataloading_process
                )
            # Token statistics differ across data-parallel and CP ranks, not across TP ranks.
            loss_mesh = self.parallel_dims.get_optional_mesh("loss")
            head.stats.reduce_group = loss_mesh.get_group() if loss_mesh is not None else None
            head.stats.device = self.device  # where a resume loads the sums into
            logger.info(describe_head(job_config, head, self.parallel_dims))
        else:
            logger.info(HEAD_OFF)
        resume.attach(self)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        # torchtitan backpropagates loss_sum / global_valid_tokens: the head folds that
        # gradient into its own pass, so dh and dW are rounded once (fused_loss: grad_scale)
        if self.fused_head is not None:
            self.fused_head.expect_loss_divisor(global_valid_tokens)
        return super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)

    def train_step(self, data_iterator):
        super().train_step(data_iterator)
        if self.fused_head is not None and self.metrics_processor.should_log(self.step):
            self.fused_head.stats.flush(self.metrics_processor.logger, self.step)

    def batch_generator(self, data_iterable):
        # Labels are still on the CPU here, so checking them costs no device sync.
        check = self.job_config.fused_ce.enable and self.job_config.fused_ce.check_labels
        for input_dict, labels in super().batch_generator(data_iterable):
            if check:
                check_labels(labels, self.model_args.vocab_size)
            yield input_dict, labels


def _exit_without_teardown() -> None:
    """CPU only, after a complete run (process group already destroyed, logs and checkpoints
    closed): torch's gloo objects were seen to abort the interpreter's final teardown
    ("terminate called without an active exception", SIGABRT) in about 1 of 10 CPU runs,
    turning a finished job into a failed one. Skip that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    try:
        main(FusedCETrainer)
    except JobRefused as e:
        if not refusals.record_refusal(str(e)):  # run_train.sh's launcher ends with it, exit code 2
            logger.error(str(e))
        sys.exit(2)
    if cpu_shims.applied():
        _exit_without_teardown()
