"""bench/gpu_evidence.py (`make gpu-evidence`), the one command for a lent GPU, rehearsed on the CPU.

The dry run (GPU_DRY_RUN=1) is the same script with tiny shapes and no build: every stage must run and be
reported, the result files must stay within the 8 a lent machine returns, and RESULTS.md must render from
them. The pieces it is made of (the test-outcome summary, the targets, the time limits, the rendering of
failures) are checked on made-up inputs, where a failure can be planted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_evidence.py"
STAGES = ["info", "build", "tests", "bench", "compare", "tests-rest"]


def load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evidence = load("gpu_evidence", SCRIPT)
plugin = load("evidence_plugin", ROOT / "bench" / "evidence_plugin.py")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(exit status, stdout, the out folder) of one dry run."""
    out = tmp_path_factory.mktemp("evidence")
    env = {**os.environ, "GPU_DRY_RUN": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--budget", "400"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=450)
    return run.returncode, run.stdout + run.stderr, out


def test_dry_run_writes_at_most_eight_files(dry_run):
    status, output, out = dry_run
    assert status == 0, output[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert set(names) == set(evidence.FILES), names
    assert len(names) <= evidence.MAX_FILES <= 8
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    # What a lent machine returns: plain names of letters, digits, '.', '_' and '-', no folders.
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)


def test_dry_run_reports_every_stage(dry_run):
    status, output, out = dry_run
    data = json.loads((out / evidence.EVIDENCE_JSON).read_text())
    assert data["dry_run"] is True
    assert [s["name"] for s in data["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in data["stages"]), data["stages"]
    assert data["seconds"] < 400 and data["env"]["torch"] == torch.__version__
    tests = data["tests"]["stages"]
    # The cuda tests collected and recorded in both test stages (skipped: no GPU); none of them twice.
    for stage in ("tests", "tests-rest"):
        assert tests[stage]["collected"] > 0 and tests[stage]["not_run"] == 0, tests
        assert tests[stage]["skipped"] == tests[stage]["collected"]
    records = [json.loads(line) for line in (out / evidence.TESTS_JSONL).read_text().splitlines()]
    first = {r["nodeid"] for r in records if r["stage"] == "tests" and r["when"] != "collection"}
    rest = {r["nodeid"] for r in records if r["stage"] == "tests-rest" and r["when"] != "collection"}
    assert any("test_engine.py" in nodeid for nodeid in first) and not first & rest
    assert any("test_cuda_symmetric.py" in nodeid for nodeid in rest)
    # The terminal summary (all a lent machine's reply shows) names every stage.
    assert all(f"  {name}" in output for name in STAGES)


def test_dry_run_renders_results(dry_run):
    _, _, out = dry_run
    text = (out / evidence.RESULTS_MD).read_text()
    assert text.startswith("# fastoptim GPU evidence") and "Dry run" in text
    for section in ("## Stages", "## Tests", "## Ceilings measured in this run", "## Targets", "## Benchmarks",
                    "## compare", "## Files"):
        assert section in text
    stages = text.split("## Stages")[1].split("##")[0]
    assert all(f"| {name} | ok |" in stages for name in STAGES)
    assert f"torch {torch.__version__}" in text
    # One benchmark run side by side: Newton–Schulz, the GPT-2 stack, NorMuon, Sophia, the optimizer step.
    bench = json.loads((out / evidence.BENCH_JSON).read_text())
    groups = {b["group"] for b in bench["benchmarks"]}
    assert {"newton_schulz 1x64x64 5 steps", "newton_schulz gpt2-small stack", "sophia_step gpt2-small"} <= groups
    assert any(g.startswith("normuon_step") for g in groups) and any(g.startswith("optimizer step") for g in groups)
    for group in groups:
        assert f"### {group}" in text
    stack = [b["extra_info"]["impl"] for b in bench["benchmarks"] if b["group"] == "newton_schulz gpt2-small stack"]
    assert "torch-loop" in stack and "fastoptim-torch" in stack
    assert ("torch.optim.Muon" in stack) == hasattr(torch.optim, "Muon")
    # Every row has a throughput and a fraction of a ceiling measured in the same run.
    assert all("tflops" in b["extra_info"] or "gbs" in b["extra_info"] for b in bench["benchmarks"])
    compare = text.split("## compare")[1].split("##")[0]
    assert "| AdamW |" in compare and "| Muon |" in compare
    assert json.loads((out / evidence.COMPARE_JSON).read_text())


def write_records(path: pathlib.Path, records: list[dict], cut_last: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text[:-10] if cut_last else text)


def test_summarize_tests_counts_outcomes_and_what_did_not_run(tmp_path):
    path = tmp_path / "tests.jsonl"
    collected = plugin.COLLECTED
    write_records(path, [
        {"nodeid": collected, "stage": "tests", "when": "collection", "outcome": "collected", "count": 6},
        {"nodeid": "a", "stage": "tests", "when": "call", "outcome": "passed"},
        {"nodeid": "b", "stage": "tests", "when": "call", "outcome": "failed", "message": "assert 1 == 2"},
        {"nodeid": "c", "stage": "tests", "when": "setup", "outcome": "failed", "message": "fixture broke"},
        {"nodeid": "d", "stage": "tests", "when": "setup", "outcome": "skipped", "message": "needs a CUDA GPU"},
        {"nodeid": "e", "stage": "tests", "when": "call", "outcome": "passed"},
        {"nodeid": "e", "stage": "tests", "when": "teardown", "outcome": "failed", "message": "leak"},
        {"nodeid": collected, "stage": "tests-rest", "when": "collection", "outcome": "collected", "count": 1},
        {"nodeid": "f", "stage": "tests-rest", "when": "call", "outcome": "passed"},  # cut short below: not counted
    ], cut_last=True)
    summary = evidence.summarize_tests(path)
    assert summary["stages"]["tests"] == {"passed": 1, "failed": 1, "error": 2, "skipped": 1, "collected": 6,
                                          "not_run": 1}
    assert summary["stages"]["tests-rest"]["not_run"] == 1
    assert [(f["nodeid"], f["outcome"]) for f in summary["failures"]] == [("b", "failed"), ("c", "error"),
                                                                           ("e", "error")]
    assert plugin.recorded_nodeids(str(path)) == {collected, "a", "b", "c", "d", "e"}


def bench_row(group, impl, median, **info):
    return {"group": group, "name": impl, "stats": {"median": median},
            "extra_info": {"impl": impl, "ceiling_matmul_tflops": 800.0, "ceiling_copy_gbs": 4000.0, **info}}


BENCH = {"benchmarks": [
    bench_row("newton_schulz gpt2-small stack", "torch.optim.Muon", 0.030),
    bench_row("newton_schulz gpt2-small stack", "fastoptim-triton", 0.012),
    bench_row("newton_schulz gpt2-small stack", "fastoptim-torch", 0.001),  # the reference: never the one compared
    bench_row("newton_schulz 1x4096x4096 5 steps", "fastoptim-cuda", 0.1, fraction_of_matmul=0.72, shape="1x4096x4096"),
    bench_row("newton_schulz 1x4096x4096 5 steps", "torch-loop", 0.1, fraction_of_matmul=0.95, shape="1x4096x4096"),
    bench_row("normuon_step 12x768x3072", "fastoptim-cuda", 0.1, fraction_of_copy=0.5, shape="12x768x3072"),
    bench_row("newton_schulz 12x768x3072 5 steps", "fastoptim-cuda", 0.030),
    bench_row("newton_schulz 12x768x3072 5 steps", "fastoptim-triton", 0.024),  # the fastest standard row
    bench_row("newton_schulz 12x768x3072 5 steps", "fastoptim-torch", 0.001),  # the reference: not compared
    bench_row("newton_schulz 12x768x3072 5 steps", "fastoptim-cuda-gram", 0.020),
    bench_row("newton_schulz 12x768x3072 5 steps", "fastoptim-triton-gram", 0.016),
    bench_row("normuon_step 1x8192x8192", "fastoptim-triton", 0.1, fraction_of_copy=0.8, shape="1x8192x8192"),
]}


def test_targets_read_off_the_benchmark_rows():
    results = {t["target"].split(":")[0]: t for t in evidence.targets(BENCH)}
    stack = results["Newton–Schulz, GPT-2-small stack"]
    assert stack["measured"] == pytest.approx(2.5) and stack["met"] and stack["implementation"] == "fastoptim-triton"
    ns = results["Newton–Schulz 4096²"]  # fastoptim's rows only: torch-loop's 95% is not ours
    assert ns["measured"] == pytest.approx(0.72) and ns["met"] is True
    normuon = results["NorMuon step"]  # the best fastoptim row over every normuon shape
    assert normuon["measured"] == pytest.approx(0.8) and normuon["met"] is False and normuon["shape"] == "1x8192x8192"
    assert results["Newton–Schulz 8192²"]["measured"] is None and results["Newton–Schulz 8192²"]["met"] is None
    gram = next(t for t in results.values() if t["kind"] == "gram")  # fastest gram row vs fastest standard row
    assert gram["measured"] == pytest.approx(0.024 / 0.016) and gram["met"] is True
    assert gram["implementation"] == "fastoptim-triton-gram"
    assert evidence.targets(None)[0]["measured"] is None


def test_results_render_failures_targets_and_tables():
    data = {
        "started": "2026-12-01T10:00:00", "budget_s": 470, "seconds": 400, "dry_run": False, "marks": "cuda or triton",
        "env": {"gpu": "NVIDIA H200", "capability": "90", "sms": 132, "memory_gib": 139.8, "l2_mib": 60,
                "driver": "580.159.04", "torch": "2.11.0", "triton": "3.6.0", "cuda_runtime": "13.0"},
        "stages": [{"name": "build", "status": "ok", "seconds": 80, "limit_s": 240, "note": "cubins: sm_90a"},
                   {"name": "tests", "status": "timeout", "seconds": 150, "limit_s": 150, "note": "a | b"}],
        "tests": {"stages": {"tests": {"passed": 10, "failed": 1, "error": 0, "skipped": 2, "collected": 20,
                                       "not_run": 7}},
                  "failures": [{"nodeid": "tests/test_ops_muon.py::test_x[cuda]", "stage": "tests",
                                "outcome": "failed", "message": "Traceback\nE   AssertionError: max error 0.5"}]},
        "targets": evidence.targets(BENCH),
        "compare": {"args": ["compare", "--device", "cuda", "--quick"],
                    "summary": [{"optimizer": "Muon", "final_validation_loss": "2.5", "tokens_per_second": "123456.7",
                                 "ms_per_optimizer_step": "1.234", "steps_to_adamw_validation_loss": "",
                                 "status": "finished"}]},
    }
    text = evidence.render_results(data, BENCH)
    assert "# fastoptim GPU evidence: NVIDIA H200, 2026-12-01" in text and "Dry run" not in text
    assert "sm_90, 132 SMs, 140 GiB, L2 60 MiB); driver 580.159.04" in text
    assert "| tests | timeout | 150 | 150 | a \\| b |" in text
    assert "| tests | 20 | 10 | 1 | 0 | 2 | 7 |" in text
    assert "- `tests/test_ops_muon.py::test_x[cuda]` (failed): E   AssertionError: max error 0.5" in text
    assert "| bf16 matmul (8192³ on a GPU) | 800.0 TFLOP/s |" in text
    assert "| 2.0x | 2.50x | fastoptim-triton | yes |" in text
    assert "| 90% | 80% | fastoptim-triton 1x8192x8192 | **no** |" in text
    assert "### newton_schulz gpt2-small stack" in text
    assert "| Muon | 2.5000 | — | 123,457 | 1.23 | finished |" in text


def test_a_stage_past_its_limit_is_stopped_and_keeps_its_output():
    start = time.monotonic()
    code = "import sys, time; print('started', flush=True); time.sleep(60)"
    result = evidence.run_command([sys.executable, "-c", code], 2.0)
    assert result["timed_out"] and result["returncode"] != 0 and "started" in result["output"]
    assert time.monotonic() - start < 30


def test_later_stages_keep_their_reserve(tmp_path):
    run = evidence.Evidence(tmp_path, budget_s=200, dry_run=True)
    later = sum(evidence.RESERVES[s] for s in ("tests", "bench", "compare", "tests-rest"))
    assert run.limit("build") <= 200 - later - evidence.MARGIN_S - evidence.GRACE_S
    assert run.limit("bench") == pytest.approx(200 - 30 - evidence.MARGIN_S - evidence.GRACE_S, abs=5)  # compare's
    assert evidence.Evidence(tmp_path / "long", budget_s=900, dry_run=True).limit("bench") == evidence.CAPS["bench"]
    # With no time left a stage is recorded as skipped, not run.
    tight = evidence.Evidence(tmp_path / "tight", budget_s=40, dry_run=True)
    assert tight.stage("bench", [sys.executable, "-c", "raise SystemExit(3)"]) is None
    assert tight.data["stages"] == [{"name": "bench", "limit_s": 0, "command": tight.data["stages"][0]["command"],
                                     "status": "skipped", "seconds": 0, "note": "no time left in the budget"}]


def test_short_build_log_keeps_the_errors():
    lines = [f"[{i}/900] nvcc -c csrc/x{i}.cu" for i in range(900)]
    lines[400] = "csrc/normuon.cu(12): error: identifier 'foo' is undefined"
    text = evidence.short_build_log("\n".join(lines))
    assert "identifier 'foo' is undefined" in text and "[0/900]" in text and "[899/900]" in text
    assert len(text.splitlines()) < 100
