"""No module of the project may shadow a standard-library module.

`python parallel/train.py` puts `parallel/` first on sys.path: a `parallel/platform.py`
then hid Python's `platform`, and torch's import crashed ("partially initialized module
'torch' has no attribute 'SymInt'").
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fused_loss", "parallel", "benchmarks", "tests")


def _module_names(package: str):
    for path in (ROOT / package).rglob("*"):
        if "__pycache__" in path.parts or "assets" in path.relative_to(ROOT).parts:
            continue
        if path.suffix == ".py":
            yield path.stem, path
        elif path.is_dir() and (path / "__init__.py").exists():
            yield path.name, path


def test_no_module_shadows_the_standard_library():
    names = [(name, path) for package in PACKAGES for name, path in _module_names(package)]
    assert len(names) > 10  # the walk found the project's modules
    shadowing = [str(path.relative_to(ROOT)) for name, path in names if name in sys.stdlib_module_names]
    assert not shadowing, f"these shadow standard-library modules: {shadowing}"


def test_train_script_help_runs_as_a_file():
    """The help path tyro suggests after a typo: the file, not the module."""
    proc = subprocess.run(
        [sys.executable, "parallel/train.py", "--job.custom_config_module=parallel.config", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--fused-ce.enable" in proc.stdout
