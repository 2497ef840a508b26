"""CPU shims for torchtitan 0.2.2, applied only when no accelerator is present.

torchtitan assumes an accelerator: it binds `device_type` when it is imported
and falls back to "cuda" on a CPU-only machine. `apply()` must therefore run
before anything imports torchtitan; `parallel/__init__.py` calls it. On a GPU
machine it changes nothing.
"""

import sys

import torch
from torch.distributed.fsdp import FSDPModule

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

    _NAMES = {"max_active": "cpu_rss_current", "max_reserved": "cpu_rss_peak"}

    def __init__(self, inner):
        self.inner = inner

    def log(self, metrics, step):
        renamed = {}
        for key, value in metrics.items():
            if "memory/" in key:
                if "num_alloc_retries" in key or "num_ooms" in key:
                    continue  # CUDA caching-allocator counters; meaningless here
                for old, new in self._NAMES.items():
                    key = key.replace(old, new)
            renamed[key] = value
        self.inner.log(renamed, step)

    def close(self):
        self.inner.close()


def _set_pg_timeouts_without_device_barrier(timeout, parallel_dims):
    # torchtitan's version calls barrier(device_ids=[...]), which only NCCL accepts (TypeError on gloo).
    torch.distributed.barrier()
    for mesh in parallel_dims.get_all_one_dimensional_meshes().values():
        torch.distributed.distributed_c10d._set_pg_timeout(timeout, mesh.get_group())
    torch.distributed.distributed_c10d._set_pg_timeout(timeout, None)


def _sum_only_fsdp_gradient_division(disable_division):
    def wrapped(model):
        disable_division(model)
        # Divide factor 1.0 makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks; a plain SUM is the same.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    return wrapped


def applied() -> bool:
    """Whether this process runs on the CPU shims (no accelerator)."""
    return torch._utils._get_available_device_type() == "cpu"


def apply() -> None:
    """Patch torchtitan for a CPU-only machine; a no-op where an accelerator exists."""
    if torch._utils._get_available_device_type() is not None:
        return
    if "torchtitan" in sys.modules:
        raise RuntimeError("parallel.cpu_shims.apply() must run before torchtitan is imported")

    # torchtitan reads the device type at import time and would pick "cuda" (set_device then fails).
    torch._utils._get_available_device_type = lambda: "cpu"

    from torchtitan.components import metrics
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.llama3.infra import parallelize as llama3_parallelize

    # torch.cpu has no memory_stats / get_device_properties / reset_peak_memory_stats.
    metrics.build_device_memory_monitor = CpuRssMonitor
    # Memory tags name what they measure (process RSS), see _RenameMemoryTags.
    build_logger = metrics._build_metric_logger
    metrics._build_metric_logger = lambda *a, **k: _RenameMemoryTags(build_logger(*a, **k))
    # gloo's barrier takes no device_ids.
    dist_utils.set_pg_timeouts = _set_pg_timeouts_without_device_barrier
    # FSDP on gloo (see _sum_only_fsdp_gradient_division).
    llama3_parallelize.disable_fsdp_gradient_division = _sum_only_fsdp_gradient_division(
        llama3_parallelize.disable_fsdp_gradient_division
    )
