"""``make demo`` from a virtual environment that is not activated, and twice in a row.

The demo's commands must run through the interpreter named by ``PYTHON`` (a venv's console scripts are
not on PATH unless it is activated), and its training step must reuse a finished run instead of
refusing it. The test takes the commands from ``make -n`` itself, so it follows the Makefile.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TINY = ["--data-dir", "{data}", "--tasks", "2", "--epochs", "1", "--batch-size", "8", "--max-per-class", "4",
        "--buffer-per-class", "2", "--dim", "32", "--depth", "1", "--heads", "4", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """A fresh virtual environment that sees this install's packages (system site packages), never activated."""
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    venv.create(env_dir, system_site_packages=True)
    return env_dir / "bin" / "python"


def demo_commands(python: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # CI runs us in make
    plan = subprocess.run(["make", "-n", "--no-print-directory", f"PYTHON={python}", "demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    return [line for line in plan.stdout.splitlines() if line.strip()]


def test_every_demo_command_runs_through_the_chosen_interpreter(python):
    commands = demo_commands(python)
    assert commands[0] == f"PYTHON={python} bash scripts/setup.sh"
    assert len(commands) == 5 and all(c.startswith(f"{python} ") for c in commands[1:]), commands
    # the console-script names alone would need the venv's bin/ on PATH
    assert not [c for c in commands if shlex.split(c)[0].startswith("cign-")]


def test_the_demos_training_step_works_from_an_inactive_venv_and_twice(python, tiny_avdigits, tmp_path):
    train = next(c for c in demo_commands(python) if "cign_train.cli.train" in c)
    assert "--reuse" in shlex.split(train)
    command = shlex.split(train) + [a.format(data=tiny_avdigits) for a in TINY] + ["--out", str(tmp_path / "run")]
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # not activated: the venv's bin/ is not on PATH
    env.pop("VIRTUAL_ENV", None)
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "task 2/2 classes" in first.stdout and "forget(AV-CIL)" in first.stdout
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "all 2 tasks are done already; reporting its results, not training again" in second.stdout
    assert "task 1/2 classes" not in second.stdout and "forget(AV-CIL)" in second.stdout


def test_the_demo_benchmark_times_every_demo_command_from_any_folder(python):
    """``benchmarks/bench_demo.py`` runs the Makefile's own demo commands (after set-up) in a scratch folder:
    one timed stage per command, and a path into the checkout made absolute."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_demo

    stages = bench_demo.demo_commands(str(python))
    assert [s for s, _ in stages] == ["generate + prepare", "train", "export", "live"]
    assert len(stages) == len(demo_commands(python)) - 1  # all but set-up
    live = stages[-1][1]
    assert live[0] == str(python) and Path(live[1]).is_absolute() and Path(live[1]).is_file(), live
