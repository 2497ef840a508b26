"""Everything this project patches in torchtitan 0.2.2, installed in one explicit order.

`apply()` must run before anything imports torchtitan: torchtitan binds `device_type` when it is
imported and falls back to "cuda" on a CPU-only machine. `parallel/train.py` (and the tests'
conftest) call it. On every device: the log tidying (`log_tidying`), one TensorBoard folder per
run (`run_folders`) and the torchtitan fixes (`torchtitan_fixes`); without an accelerator, the CPU
shims (`cpu_shims`) after them.

The order matters: `run_folders` and `cpu_shims` both wrap torchtitan's
`metrics._build_metric_logger`. The run-folder wrapper writes the run's seed through the
TensorBoard logger it finds in torchtitan's LoggerContainer; the CPU memory-tag wrapper
(`cpu_shims._RenameMemoryTags`) hides that container. So the run-folder wrapper is installed
first (the inner one), or the seed silently stops reaching TensorBoard
(tests/integration/test_run_folders.py checks that the seed does reach it on the CPU).
"""

import torch

from parallel import cpu_shims, log_tidying, run_folders, torchtitan_fixes


def apply() -> None:
    """Patch torchtitan: on every device the log tidying, the run folders and the torchtitan fixes;
    on a CPU-only machine then the CPU shims (this order: see the module's docstring)."""
    device = torch._utils._get_available_device_type()
    if device == "cpu":
        return  # applied already (torch itself says None on a CPU-only machine)
    cpu = device is None
    if cpu:
        cpu_shims.bind_cpu_device()  # before torchtitan is imported (the installs below import it)
    log_tidying.install(cpu)
    run_folders.install()  # before cpu_shims.install(), whose memory-tag wrapper goes around it
    torchtitan_fixes.install()
    if cpu:
        cpu_shims.install()
