"""CPU shims for torchtitan 0.2.2, applied only when no accelerator is present (by
parallel.patches, which installs the patches every device gets first).

torchtitan assumes an accelerator: it binds `device_type` when it is imported and falls back to
"cuda" on a CPU-only machine; `bind_cpu_device()` must therefore run before anything imports
torchtitan, and `install()` after the every-device patches (parallel.patches says why).
"""

import os
import sys
import warnings

import torch
from torch.distributed.distributed_c10d import ProcessGroupGloo
from torch.distributed.fsdp import FSDPModule

from parallel.metrics import CPU_MEMORY_RENAMES

_GIB = 2**30


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class CpuRssMonitor:
    """Stands in for torchtitan's DeviceMemoryMonitor: reports this process's
    resident set size (current and peak), not any accelerator's memory."""

    device_name = "cpu (memory figures are this process's RSS, not GPU memory)"

    def __init__(self):
        with open("/proc/meminfo") as f:
            self.device_capacity = int(f.readline().split()[1]) * 1024  # MemTotal
        self.device_capacity_gib = self.device_capacity / _GIB
        self.reset_peak_stats()

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        rss, hwm = _status_kib("VmRSS") * 1024, _status_kib("VmHWM") * 1024
        return DeviceMemStats(
            rss / _GIB, 100 * rss / self.device_capacity,
            hwm / _GIB, 100 * hwm / self.device_capacity,
            0, 0,
        )

    def reset_peak_stats(self):
        # Writing "5" resets VmHWM (Linux >= 4.0), so each log window gets its own peak, as on GPU.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


class _RenameMemoryTags:
    """Wraps torchtitan's metric logger so that the memory tags say `cpu_rss`:
    a CPU run's curves must not be mistaken for GPU memory next to GPU runs."""

    def __init__(self, inner):
        self.inner = inner

    def log(self, metrics, step):
        renamed = {}
        for key, value in metrics.items():
            if key == "mfu(%)":
                continue  # no peak FLOPS for a CPU: see _peak_flops_unknown
            if "memory/" in key:
                if "num_alloc_retries" in key or "num_ooms" in key:
                    continue  # CUDA caching-allocator counters; meaningless here
                for old, new in CPU_MEMORY_RENAMES.items():
                    key = key.replace(old, new)
            renamed[key] = value
        self.inner.log(renamed, step)

    def close(self):
        self.inner.close()


def _set_pg_timeouts_without_device_barrier(timeout, parallel_dims):
    # torchtitan's version calls barrier(device_ids=[...]), which only NCCL accepts (TypeError on gloo).
    torch.distributed.barrier()
    groups = [mesh.get_group() for mesh in parallel_dims.get_all_one_dimensional_meshes().values()]
    for group in [*groups, torch.distributed.distributed_c10d._get_default_group()]:
        # Size-1 mesh dimensions get a FakeProcessGroup, where torch would only warn ("Set timeout
        # is now only supported for either nccl or gloo"): set gloo groups' timeouts, skip the rest.
        cpu = torch.device("cpu")
        if cpu in group._device_types and isinstance(group._get_backend(cpu), ProcessGroupGloo):
            torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)


def _sum_only_fsdp_gradient_division(disable_division):
    def wrapped(model):
        disable_division(model)
        # Divide factor 1.0 makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks; a plain SUM is the same.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    return wrapped


def _histc_accepting_integers(histc):
    def wrapped(input, *args, **kwargs):
        if input.is_floating_point() or input.is_cuda:
            return histc(input, *args, **kwargs)
        # CUDA's histc counts integer tensors, the CPU's refuses them ("histogram_cpu" not
        # implemented for 'Long'): MoE routers count tokens per expert that way. float64 is exact.
        return histc(input.double(), *args, **kwargs).to(input.dtype)

    return wrapped


def _cpu_autocast_accepting_fp32(init):
    def wrapped(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        # CUDA autocasts to float32 when asked; the CPU refuses it with a warning and runs without
        # autocast, so gpt_oss's bf16 blocks meet fp32 activations ("mat1 and mat2 must have the
        # same dtype"), in the forward and in activation checkpointing's recompute.
        fp32_on_cpu = device_type == "cpu" and dtype == torch.float32 and enabled
        init(self, device_type, torch.bfloat16 if fp32_on_cpu else dtype, enabled, cache_enabled)
        if fp32_on_cpu:
            self.fast_dtype = torch.float32

    return wrapped


def _allow_flex_attention_backward_on_cpu(validate_device):
    def wrapped(query, key, value):
        # torch refuses gradients through FlexAttention on the CPU because inductor's CPU kernel
        # has no backward; the eager path (dense math, no compile) has one and is used instead.
        if query.device.type != "cpu":
            validate_device(query, key, value)

    return wrapped


def _flex_attention_eager(set_determinism):
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.attention import FlexAttentionWrapper

    def use_eager():
        # The compiled FlexAttention (inductor's CPU kernel) has no backward; the eager one has.
        FlexAttentionWrapper._compiled_flex_attn = flex_attention

    def wrapped(*args, **kwargs):
        set_determinism(*args, **kwargs)
        use_eager()  # deterministic mode installs a compiled one again

    use_eager()
    return wrapped


def _experts_for_loop(update_from_config):
    def wrapped(self, *args, **kwargs):
        update_from_config(self, *args, **kwargs)
        # llama4, deepseek_v3 and gpt_oss drop grouped mm without an SM90 GPU; qwen3 keeps it, and
        # its token permutation is a Triton kernel ("0 active drivers" on the CPU). Same rule here.
        self.moe_args.use_grouped_mm = False

    return wrapped


def _peak_flops_unknown(device_name: str) -> float:
    # torchtitan runs lspci (absent: a warning) and then measures a CPU against an A100's peak
    # (another warning, and a meaningless MFU). NaN makes the MFU "n/a" (see _LogText).
    return float("nan")


def _without_nccl_environment(init_distributed):
    def wrapped(*args, **kwargs):
        # torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING; torchtitan then warns that it overrides it.
        # NCCL and its flight recorder play no part on the CPU.
        for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                     "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE"):
            os.environ.pop(name, None)
        return init_distributed(*args, **kwargs)

    return wrapped


def applied() -> bool:
    """Whether this process runs on the CPU shims (no accelerator)."""
    return torch._utils._get_available_device_type() == "cpu"


def bind_cpu_device() -> None:
    """torchtitan's device type is "cpu": it reads it at import time and would pick "cuda"
    (set_device then fails). Before torchtitan is imported."""
    if "torchtitan" in sys.modules:
        raise RuntimeError("parallel.patches.apply() must run before torchtitan is imported")
    torch._utils._get_available_device_type = lambda: "cpu"


def install() -> None:
    """Patch torchtitan for a CPU-only machine (after bind_cpu_device and the every-device patches)."""
    from torchtitan.components import metrics
    from torchtitan.distributed import utils as dist_utils
    from torch.nn.attention import flex_attention as flex_attention_module
    from torchtitan.models.llama3.infra import parallelize as llama3_parallelize
    from torchtitan.models.llama4.infra import parallelize as llama4_parallelize
    from torchtitan.models.qwen3.model import args as qwen3_args
    from torchtitan.tools import utils as titan_utils

    # torch.cpu has no memory_stats / get_device_properties / reset_peak_memory_stats.
    metrics.build_device_memory_monitor = CpuRssMonitor
    # Memory tags name what they measure (process RSS), see _RenameMemoryTags.
    build_logger = metrics._build_metric_logger
    metrics._build_metric_logger = lambda *a, **k: _RenameMemoryTags(build_logger(*a, **k))
    # MFU says n/a, without lspci or A100 warnings (see _peak_flops_unknown); tensorboard drops it.
    titan_utils.get_peak_flops = _peak_flops_unknown
    # No NCCL environment warnings (see _without_nccl_environment).
    dist_utils.init_distributed = _without_nccl_environment(dist_utils.init_distributed)
    # gloo's barrier takes no device_ids.
    dist_utils.set_pg_timeouts = _set_pg_timeouts_without_device_barrier
    # FSDP on gloo (see _sum_only_fsdp_gradient_division): llama3's apply_fsdp, and llama4's,
    # which deepseek_v3, qwen3 and gpt_oss use, each call their own binding of the function.
    for module in (llama3_parallelize, llama4_parallelize):
        module.disable_fsdp_gradient_division = _sum_only_fsdp_gradient_division(
            module.disable_fsdp_gradient_division
        )
    # MoE token counting (deepseek_v3, llama4, qwen3 MoE, gpt_oss) calls histc on int64 (see _histc_accepting_integers).
    torch.histc = _histc_accepting_integers(torch.histc)
    # mixed_precision_param = "float32" autocasts to fp32 as on CUDA (see _cpu_autocast_accepting_fp32).
    torch.autocast.__init__ = _cpu_autocast_accepting_fp32(torch.autocast.__init__)
    # qwen3 MoE experts run as a for-loop, as the other MoE families do here (see _experts_for_loop).
    qwen3_args.Qwen3ModelArgs.update_from_config = _experts_for_loop(qwen3_args.Qwen3ModelArgs.update_from_config)
    # FlexAttention (gpt_oss; attn_type "flex" elsewhere) runs eagerly: see _flex_attention_eager and
    # _allow_flex_attention_backward_on_cpu; its warning that eager is unfused is the point here.
    dist_utils.set_determinism = _flex_attention_eager(dist_utils.set_determinism)
    flex_attention_module._validate_device = _allow_flex_attention_backward_on_cpu(flex_attention_module._validate_device)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
