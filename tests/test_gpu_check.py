"""packaging/gpu-check.sh, the one prepared GPU check (issue 21): its harness, tested on the CPU.

The pieces (a step past its share of the deadline, JUnit counts, the acceptance figures) are tested directly;
`gpu-check.sh --cpu` runs the whole harness at CPU size and must write one JSON file with every step's figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "packaging" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_a_step_past_its_share_of_the_deadline_is_stopped_and_recorded(tmp_path):
    steps = gpu_check.Steps(deadline_s=30, work=tmp_path)
    slow = steps.run("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], cap_s=11)
    assert slow["timed_out"] and slow["rc"] is None and 10 < slow["seconds"] < 30 and "started" in slow["output_tail"]
    fast = steps.run("fast", [sys.executable, "-c", "print('{\"x\": 1}')"], cap_s=60, parse=json.loads)
    assert fast["rc"] == 0 and fast["result"] == {"x": 1}
    broken = steps.run("broken", [sys.executable, "-c", "print('not json')"], cap_s=60, parse=json.loads)
    assert broken["rc"] == 0 and "parse_error" in broken and "result" not in broken
    steps.end = 0  # the deadline has passed: the next step does not start
    assert "skipped" in steps.run("late", [sys.executable, "-c", "pass"], cap_s=60)


def test_junit_counts_and_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" name="test_skip">'
                   '<skipped/></testcase><testcase classname="tests.test_a" name="test_bad"><failure message="assert 2 == 1"/>'
                   '</testcase><testcase classname="tests.test_b" name="test_ok2"/></testsuite></testsuites>')
    counts = gpu_check.junit(xml)("")
    assert {k: counts[k] for k in ("tests", "passed", "failures", "skipped")} == {"tests": 4, "passed": 2, "failures": 1, "skipped": 1}
    assert counts["failed"] == [{"test": "tests.test_a::test_bad", "message": "assert 2 == 1"}]


def test_acceptance_reads_the_memory_run_at_the_longest_context():
    speed = {"weight_read_floor_ms": 1.2, "runs": [
        {"context": 32768, "edgectx_memory": {"prefill_s": 10.0, "decode_ms_per_token": 20.0, "peak_gpu_bytes": 9 << 30}},
        {"context": 131072, "edgectx_memory": {"prefill_s": 61.0, "decode_ms_per_token": 25.0, "peak_gpu_bytes": 15 << 30,
                                               "decode_floor_ratio": 20.8}}]}
    result = gpu_check.acceptance(speed, 131072)
    assert result["measured"] and result["meets"] == {"prefill_s": False, "decode_ms_per_token": True, "peak_gpu_bytes": True}
    assert result["decode_floor_ratio"] == 20.8 and result["weight_read_floor_ms"] == 1.2
    missing = gpu_check.acceptance({"runs": [{"context": 131072, "edgectx_memory": None,
                                              "edgectx_memory_error": "out of GPU memory after 32768 tokens"}]}, 131072)
    assert not missing["measured"] and missing["why"] == "out of GPU memory after 32768 tokens"


@pytest.mark.slow  # minutes on a busy 2-core machine: every step in its own process
def test_the_cpu_half_writes_every_figure_to_one_json_file(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}  # this interpreter, not whatever python3 is first on PATH
    done = subprocess.run(["bash", str(ROOT / "packaging" / "gpu-check.sh"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert report["mode"] == "cpu" and set(steps) == {"machine", "gpu_tests", "kernel_tests", "bench_kernels",
                                                       "bench_gguf_matvec", "bench_speed", "plan", "decode_profile"}
    assert steps["decode_profile"] == {"skipped": "needs a CUDA GPU"}
    assert steps["machine"]["result"]["modules"]["torch"] and steps["machine"]["result"]["cuda"] is False
    gpu_tests = steps["gpu_tests"]["result"]
    assert gpu_tests["tests"] > 0 and gpu_tests["skipped"] == gpu_tests["tests"]  # every GPU test skips on a CPU
    assert steps["kernel_tests"]["result"]["passed"] == 3, steps["kernel_tests"]  # the specialization tests run here
    assert steps["bench_kernels"] == {"skipped": "needs a CUDA GPU"}
    speed = steps["bench_speed"]["result"]
    assert speed["synthetic"] == "tiny" and [r["context"] for r in speed["runs"]] == [300, 600]
    acceptance = report["acceptance"]
    assert acceptance["measured"] and acceptance["context"] == 600 and acceptance["decode_ms_per_token"] > 0
    assert report["plan_vs_measured"]["plan_device_total_bytes"] == steps["plan"]["result"]["device_total_bytes"] > 0
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_prepared_profile_runs_at_cpu_size(tmp_path):
    """packaging/gpu_profile.py (the next GPU run's decode profile) runs end to end on the tiny model here."""
    done = subprocess.run([sys.executable, str(ROOT / "packaging" / "gpu_profile.py"), "--synthetic", "tiny", "--context", "600",
                           "--steps", "3", "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "EDGECTX_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert len(report["step_ms"]) == 3 == len(report["step_ms_unprofiled"]) and "aten::" in report["by_self_cuda"]
    assert report["planned_weight_bytes"] > 0 and report["prefill_s"] >= 0


def test_the_profiles_figures_are_its_last_json_document():
    """gpu_profile.py prints its build's figures on one line first (kept if the run is stopped), then everything."""
    out = '{"build": {"build_s": 1.0}}\n{\n "build": {"build_s": 1.0},\n "step_ms": [\n  {"a": 1}\n ]\n}\n'
    assert gpu_check.last_json(out) == {"build": {"build_s": 1.0}, "step_ms": [{"a": 1}]}
    assert gpu_check.last_json('{"build": {}}\n') == {"build": {}}
