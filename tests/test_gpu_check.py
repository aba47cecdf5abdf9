"""``benchmarks/gpu_check.py`` (``make bench-gpu``) without a GPU: its plan, the dry run that checks every step's
arguments against the step's own parser, the refusal to run without a GPU, and how steps fail, time out and
skip what depends on them."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def step(name: str) -> gpu_check.Step:
    return next(s for s in gpu_check.plan() if s.name == name)


def with_arg(s: gpu_check.Step, old: str, new: str) -> gpu_check.Step:
    assert old in s.argv, s.argv
    return dataclasses.replace(s, argv=tuple(new if a == old else a for a in s.argv))


def test_the_plan_fits_its_budget_and_puts_the_latencies_first():
    steps = gpu_check.plan()
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert sum(s.budget_s for s in steps) <= gpu_check.TOTAL_BUDGET_S == 480
    for i, s in enumerate(steps):
        assert set(s.needs) <= set(names[:i]), f"{s.name} needs a step that runs after it"
        assert s.argv[0] == sys.executable and s.budget_s > 0
    # the paper preset's latencies need nothing and run right after the first nvidia-smi
    assert names[:2] == ["smi-before", "bench-paper"] and not steps[1].needs and names[-1] == "smi-after"
    results = {p.name for s in steps for p in s.writes if p.parent == gpu_check.RESULTS}
    assert results == {"gpu_latency_paper.json", "gpu_latency_avdigits.json", "gpu_latency_paper_compile.json",
                       "gpu_default_run.json", "gpu_train.json", "torch_parity_cuda.json"}


def test_the_dry_run_lists_every_step_and_finds_every_argument_valid():
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for s in gpu_check.plan():
        assert f"{s.name:<16}arguments ok" in p.stdout
    assert "total budget 480 s" in p.stdout and "all steps valid" in p.stdout


def test_the_dry_run_catches_a_backend_cign_bench_does_not_know():
    good = step("bench-paper")
    bad = with_arg(good, "torch-cuda,ort-cuda,ort-trt,trt", "torch-cuda,ort-gpu")
    assert gpu_check.validate([good]) == {}
    problems = gpu_check.validate([bad])
    assert "--backends" in problems["bench-paper"] and "ort-gpu" in problems["bench-paper"]


def test_the_dry_run_catches_a_bad_torch_mode_and_a_bad_bench_train_argument():
    problems = gpu_check.validate([with_arg(step("bench-paper"), "eager,graph", "eager,warp")])
    assert "--torch-modes" in problems["bench-paper"] and "'warp'" in problems["bench-paper"]
    problems = gpu_check.validate([with_arg(step("bench-train"), "20", "twenty")])
    assert "invalid int value: 'twenty'" in problems["bench-train"]
    assert gpu_check.validate([step("bench-train")]) == {}


def test_the_dry_run_checks_a_path_an_earlier_step_makes_against_a_stand_in():
    problems = gpu_check.validate([step("export"), step("train")])
    assert "train" in problems["plan"] and "export" not in problems  # the run folder exists by then
    assert "does not exist" in gpu_check.validate([step("export")])["export"]


def test_without_a_gpu_it_exits_2_and_writes_nothing(tmp_path):
    if gpu_check.no_gpu_reason() is None:
        pytest.skip("a CUDA GPU is here: the check would run")
    results, scratch = tmp_path / "results", tmp_path / "scratch"
    p = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--scratch", str(scratch)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA GPU found" in p.stderr and "--dry-run" in p.stderr
    assert not results.exists() and not scratch.exists() and p.stdout == ""


def test_a_failed_step_skips_what_needs_it_and_a_timeout_ends_the_whole_process_group(tmp_path):
    py = sys.executable
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    steps = [gpu_check.Step("hang", (py, "-c", hang), 1, ()),
             gpu_check.Step("fail", (py, "-c", "print('half\\rdone'); raise SystemExit(3)"), 5, ()),
             gpu_check.Step("after-fail", (py, "-c", "print('ran')"), 5, (), needs=("fail",)),
             gpu_check.Step("free", (py, "-c", "print('ran')"), 5, ())]
    start = time.perf_counter()
    summary = gpu_check.execute(steps, tmp_path / "results", tmp_path / "scratch", echo=lambda line: None)
    assert time.perf_counter() - start < 15
    records = {r["name"]: r for r in summary["steps"]}
    assert [records[n]["status"] for n in ("hang", "fail", "after-fail", "free")] == ["timed out", "failed", "skipped", "ok"]
    assert records["fail"]["returncode"] == 3 and records["fail"]["tail"] == "done"
    assert "fail" in records["after-fail"]["reason"] and records["free"]["tail"] == "ran"
    assert records["free"]["timeout_s"] >= 5  # its budget, plus what the skipped step left
    assert json.loads((tmp_path / "results" / "gpu_check.json").read_text())["steps"][-1]["name"] == "free"
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.2)
    assert not grandchild.exists() or grandchild.read_text().split(") ")[1][0] in "ZX", "the step's child still runs"


def test_the_cuda_tests_count_from_junit_xml(tmp_path):
    xml = tmp_path / "junit.xml"
    case = '<testcase classname="{}" name="{}">{}</testcase>'
    cases = [case.format("tests.test_a", "test_ok", ""),
             case.format("tests.test_a", "test_skip", '<skipped message="no"/>'),
             case.format("", "tests.test_audio", '<error message="collection failure">E   OSError: PortAudio library not found</error>')]
    xml.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    counts = gpu_check.junit_counts(xml)({"returncode": 1})
    assert counts["passed"] == 1 and counts["skipped"] == 1 and counts["failed"] == counts["errors"] == 0
    assert counts["not_collected"] == ["tests.test_audio: E   OSError: PortAudio library not found"]
    cases.append(case.format("tests.test_a", "test_broken", '<failure message="assert 0"/>'))
    xml.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    with pytest.raises(gpu_check.StepFailed, match="test_broken"):
        gpu_check.junit_counts(xml)({"returncode": 1})


def test_the_steps_find_the_torch_runner_in_a_checkout_that_is_not_installed(tmp_path, monkeypatch):
    """On a GPU machine the checkout is on PYTHONPATH, not pip-installed: no entry points, so cign-bench would list
    torch-cuda as not installed. The steps then get a dist-info with pyproject.toml's entry points."""
    import importlib.metadata

    pytest.importorskip("tomllib")
    if importlib.metadata.entry_points(group="cign_runtime.runners", name="torch"):  # installed: nothing to add
        assert gpu_check.metadata_shim(tmp_path / "installed") is None
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: ())
    folder = gpu_check.metadata_shim(tmp_path / "shim")
    (dist,) = importlib.metadata.distributions(path=[str(folder)])
    runners = [e for e in dist.entry_points if e.group == "cign_runtime.runners"]
    assert [(e.name, e.value) for e in runners] == [("torch", "cign_export.torch_backend:TorchRunner")]
    assert "cign-bench" in {e.name for e in dist.entry_points if e.group == "console_scripts"}
