"""The one command for a lent GPU machine: build, test, benchmark, compare, and RESULTS.md in one folder.

    python3 bench/gpu_evidence.py --out OUT [--budget 470]     (make gpu-evidence OUT=...)
    GPU_DRY_RUN=1 python3 bench/gpu_evidence.py --out OUT      (the CPU rehearsal that CI runs)

A lent machine (one H100/H200, 16 cores, no internet) returns at most 8 files from one folder and one command
may run 10 minutes, so everything here fits a time budget (default 470 s) and writes only FILES. Each stage is
a subprocess with a hard limit taken from what is left of the budget (later stages keep a reserve), stopped with
SIGINT (pytest then still writes its summary and pytest-benchmark its JSON) and, if need be, SIGKILL; the
results so far are rewritten after every stage, so even a run killed from outside leaves its files.

Stages, in order:
  info        versions, GPU, driver (nvidia-smi), nvcc, `python -m fastoptim info`
  build       the extension for sm_90a only (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS = cores); the log kept short
  tests       the cuda- and triton-marked tests of PRIORITY_TESTS, in that order: CUDA-graph capture,
              Newton–Schulz, the optimizers end to end, then every other op (correctness on the GPU)
  bench       the headline benchmarks in ONE pytest-benchmark run, so they share the ceilings it measures
              (a large bf16 matmul, a large device copy): Newton–Schulz at 4096² and 8192² and on the
              GPT-2-small stack (cuda, triton, torch, torch.optim.Muon's per-matrix iteration), NorMuon and
              Sophia steps, a whole optimizer step over GPT-2 124M's shapes beside fused AdamW and torch.optim.Muon
  compare     python -m fastoptim compare --device cuda --quick
  tests-rest  every other cuda/triton test, in whatever time is left (the ahead-of-time Triton compile
              test is CI's: it needs no GPU)

GPU_DRY_RUN=1 (or --dry-run) runs the same stages on the CPU with tiny shapes: no build (setup.py only
reports its version), the cuda-marked tests (which skip there; the last stage only over the files
that hold the rest), the CPU benchmark shapes, a 2-step compare.
Only the standard library, torch and what the repository's tests and benchmarks use are needed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent

# Everything this script writes under --out; a lent machine returns at most MAX_FILES files.
RESULTS_MD = "RESULTS.md"
EVIDENCE_JSON = "evidence.json"  # all of it, machine-readable: environment, stages, test outcomes, ceilings
BUILD_LOG = "build.log"
RUN_LOG = "run.log"  # the timeline and the tail of each stage's output
TESTS_JSONL = "tests.jsonl"  # one line per test report (bench/evidence_plugin.py)
BENCH_JSON = "bench.json"  # pytest-benchmark's JSON
COMPARE_JSON = "compare.json"  # compare's results.json
FILES = (RESULTS_MD, EVIDENCE_JSON, BUILD_LOG, RUN_LOG, TESTS_JSONL, BENCH_JSON, COMPARE_JSON)
MAX_FILES = 8

# The prioritized tests: what must be known first if time runs out.
PRIORITY_TESTS = (
    "tests/test_engine.py",  # a whole Muon/NorMuon step captured in a CUDA graph
    "tests/test_ops_newton_schulz.py",  # every Newton–Schulz backend, graph capture included
    "tests/test_cuda_gemm_lt.py",  # the NS drivers' cuBLASLt GEMMs (the default driver) against torch
    "tests/test_optim_backends.py",  # the optimizers end to end on cuda and triton vs the torch trajectory
    "tests/test_ops_muon.py",
    "tests/test_ops_normuon.py",
    "tests/test_ops_sophia.py",
    "tests/test_ops_errors.py",
)
NOT_ON_GPU = ("tests/test_triton_compile.py",)  # compiles for sm_90/sm_80 without a GPU: CI runs it
BENCH_FILES = ("bench/bench_newton_schulz.py", "bench/bench_steps.py", "bench/bench_optimizers.py")

# Seconds: each stage's cap, and the least a stage is guaranteed when an earlier one runs long.
CAPS = {"info": 60, "build": 240, "tests": 150, "bench": 150, "compare": 75, "tests-rest": 10**6}
RESERVES = {"info": 0, "build": 0, "tests": 45, "bench": 75, "compare": 30, "tests-rest": 0}
GRACE_S = 20  # after SIGINT, before SIGKILL
MARGIN_S = 10  # for the final write

GPU = {
    "marks": "cuda or triton",
    "ns_shapes": ("1x4096x4096", "1x8192x8192", "12x768x3072"),
    "bench_options": ["--benchmark-max-time=0.25", "--benchmark-min-rounds=5"],
    "compare": ["--device", "cuda", "--quick"],
    "rest": ["tests"],
}
DRY = {
    "marks": "cuda",
    "ns_shapes": ("1x64x64", "1x48x96"),
    "bench_options": ["--benchmark-max-time=0.002", "--benchmark-min-rounds=1"],
    "compare": ["--device", "cpu", "--quick", "--steps", "2", "--optimizers", "adamw,muon"],
    # The one other file with cuda tests, and one the first stage ran (so its deselection is exercised).
    "rest": ["tests/test_cuda_symmetric.py", "tests/test_engine.py"],
}
BUILD_CHECK = (
    "import torch, fastoptim._C as c; "
    "assert c.TORCH_VERSION == torch.__version__, (c.TORCH_VERSION, torch.__version__); print(c.__file__)"
)
PER_TEST_TIMEOUT_S = 120  # pytest-timeout, where installed: one hung test must not take the whole stage

# The targets of issue 15, read off the benchmark rows.
TARGETS = (
    ("Newton–Schulz, GPT-2-small stack: fastoptim vs torch.optim.Muon's per-matrix loop", "speedup",
     "newton_schulz gpt2-small stack", "torch.optim.Muon", 2.0),
    ("Newton–Schulz 4096²: fraction of the measured bf16 matmul ceiling", "matmul",
     "newton_schulz 1x4096x4096 5 steps", None, 0.70),
    ("Newton–Schulz 8192²: fraction of the measured bf16 matmul ceiling", "matmul",
     "newton_schulz 1x8192x8192 5 steps", None, 0.70),
    ("Gram Newton–Schulz vs the standard method, 12 x 768 x 3072 stack (fastest of each)", "gram",
     "newton_schulz 12x768x3072 5 steps", None, 1.4),
    ("NorMuon step: fraction of the measured copy bandwidth", "copy", "normuon_step", None, 0.90),
    ("Sophia step: fraction of the measured copy bandwidth", "copy", "sophia_step", None, 0.90),
)


# --------------------------------------------------------------------------------------------------
# Running a stage


def run_command(cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
    """Run cmd (stdout and stderr together) for at most limit_s seconds; then SIGINT its process group, then
    SIGKILL. Returns returncode, output, seconds, timed_out."""
    start = time.monotonic()
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )
    timed_out = False
    try:
        output, _ = process.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        output = ""
        for sig, grace in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                output, _ = process.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    return {"returncode": process.returncode, "output": output or "", "seconds": time.monotonic() - start,
            "timed_out": timed_out}


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def short_build_log(text: str, head: int = 15, tail_lines: int = 60, notable: int = 80) -> str:
    """The start, the errors and warnings, and the end of a build log."""
    lines = text.rstrip().splitlines()
    if len(lines) <= head + tail_lines:
        return "\n".join(lines)
    middle = lines[head:-tail_lines]
    keys = ("error", "warning", "ptxas", "fastoptim setup", "Traceback")
    picked = [line for line in middle if any(key in line for key in keys)][:notable]
    return "\n".join(
        lines[:head] + [f"... ({len(middle)} lines, of which these name an error or warning:)"] + picked
        + ["..."] + lines[-tail_lines:]
    )


# --------------------------------------------------------------------------------------------------
# What the results files hold


def summarize_tests(path: pathlib.Path) -> dict:
    """Per stage: collected, passed, failed, errors, skipped, not run; and the failures (worst report wins)."""
    outcomes: dict[str, tuple[str, str, str]] = {}  # nodeid -> (stage, outcome, message)
    collected: dict[str, int] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            stage = record.get("stage", "")
            if record.get("when") == "collection":
                collected[stage] = collected.get(stage, 0) + record.get("count", 0)
                continue
            outcome = record.get("outcome")
            if outcome == "failed":
                outcome = "failed" if record.get("when") == "call" else "error"
            if outcome not in rank:
                continue
            previous = outcomes.get(record["nodeid"])
            if previous is None or rank[outcome] > rank[previous[1]]:
                outcomes[record["nodeid"]] = (stage, outcome, record.get("message", ""))
    stages: dict[str, dict] = {}
    for stage, outcome, _ in outcomes.values():
        counts = stages.setdefault(stage, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        counts[outcome] += 1
    for stage, count in collected.items():
        counts = stages.setdefault(stage, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        counts["collected"] = count
        counts["not_run"] = max(0, count - sum(counts[k] for k in ("passed", "failed", "error", "skipped")))
    failures = [
        {"nodeid": nodeid, "stage": stage, "outcome": outcome, "message": message}
        for nodeid, (stage, outcome, message) in sorted(outcomes.items())
        if outcome in ("failed", "error")
    ]
    return {"stages": stages, "failures": failures}


def best_row(rows: list[dict], prefix: str, key: str) -> dict | None:
    """The fastoptim row of the groups starting with prefix with the largest extra_info[key]."""
    candidates = [r for r in rows if (r.get("group") or "").startswith(prefix)
                  and r["extra_info"].get("impl", "").startswith("fastoptim-") and r["extra_info"].get(key)]
    return max(candidates, key=lambda r: r["extra_info"][key], default=None)


def targets(bench: dict | None) -> list[dict]:
    """Each target of issue 15: what this run measured against it, and whether it is met."""
    rows = (bench or {}).get("benchmarks", [])
    results = []
    for text, kind, group, baseline, goal in TARGETS:
        measured, best = None, None
        if kind == "speedup":
            group_rows = [r for r in rows if r.get("group") == group]
            base = next((r for r in group_rows if r["extra_info"].get("impl") == baseline), None)
            ours = [r for r in group_rows if r["extra_info"].get("impl", "").startswith("fastoptim-")
                    and r["extra_info"].get("impl") != "fastoptim-torch"]
            fastest = min(ours, key=lambda r: r["stats"]["median"], default=None)
            if base is not None and fastest is not None:
                measured, best = base["stats"]["median"] / fastest["stats"]["median"], fastest
        elif kind == "gram":
            ours = [r for r in rows if r.get("group") == group  # the reference (fastoptim-torch*) is not compared
                    and r["extra_info"].get("impl", "").startswith("fastoptim-")
                    and not r["extra_info"]["impl"].startswith("fastoptim-torch")]
            gram = min((r for r in ours if r["extra_info"]["impl"].endswith("-gram")),
                       key=lambda r: r["stats"]["median"], default=None)
            standard = min((r for r in ours if not r["extra_info"]["impl"].endswith("-gram")),
                           key=lambda r: r["stats"]["median"], default=None)
            if gram is not None and standard is not None:
                measured, best = standard["stats"]["median"] / gram["stats"]["median"], gram
        else:
            key = "fraction_of_matmul" if kind == "matmul" else "fraction_of_copy"
            best = best_row(rows, group, key)
            measured = best["extra_info"][key] if best is not None else None
        results.append({
            "target": text, "goal": goal, "kind": kind, "measured": measured,
            "implementation": None if best is None else best["extra_info"].get("impl"),
            "shape": None if best is None else best["extra_info"].get("shape"),
            "met": None if measured is None else measured >= goal,
        })
    return results


def _load_thresholds():
    spec = importlib.util.spec_from_file_location("bench_thresholds", BENCH / "thresholds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_render():
    spec = importlib.util.spec_from_file_location("bench_render", BENCH / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(value) -> str:
    return "—" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")


def _number(value, spec: str) -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "—"


def render_results(evidence: dict, bench: dict | None) -> str:
    """RESULTS.md from what ran: the machine, the stages, the tests and their failures, the ceilings, the
    targets, the benchmark tables and the compare summary."""
    env = evidence.get("env", {})
    gpu = env.get("gpu") or "no GPU"
    lines = [f"# fastoptim GPU evidence: {gpu}, {evidence.get('started', '?')[:10]}", ""]
    if evidence.get("dry_run"):
        lines += ["**Dry run (GPU_DRY_RUN=1) on the CPU: tiny shapes, no build, the cuda tests skip. These numbers "
                  "check that the script works; they say nothing about GPU speed.**", ""]
    capability = env.get("capability")
    lines += [
        f"- GPU: {gpu}" + (f" (sm_{capability}, {env.get('sms')} SMs, {_number(env.get('memory_gib'), '.0f')} GiB, "
                           f"L2 {_number(env.get('l2_mib'), '.0f')} MiB)" if capability else "")
        + f"; driver {env.get('driver') or '—'}",
        f"- versions: fastoptim {env.get('fastoptim', '?')}, torch {env.get('torch', '?')}, "
        f"triton {env.get('triton') or 'none'}, CUDA {env.get('cuda_runtime') or 'none'} (torch build), "
        f"nvcc {env.get('nvcc') or 'none'}, python {env.get('python', '?')}",
        f"- host: {env.get('cpu_count', '?')} CPU cores; commit {env.get('commit') or 'unknown'}",
        f"- run: started {evidence.get('started', '?')} (UTC), budget {evidence.get('budget_s')} s, "
        f"took {_number(evidence.get('seconds'), '.0f')} s; torch.optim.Muon's Newton–Schulz: "
        f"{env.get('torch_optim_muon') or '—'}",
        "",
        "## Stages",
        "",
        "| stage | status | seconds | limit s | note |",
        "|---|---|---:|---:|---|",
    ]
    for stage in evidence.get("stages", []):
        lines.append(f"| {stage['name']} | {stage['status']} | {_number(stage.get('seconds'), '.0f')} | "
                     f"{_number(stage.get('limit_s'), '.0f')} | {_cell(stage.get('note'))} |")

    tests = evidence.get("tests", {})
    lines += ["", f"## Tests (marked {evidence.get('marks', '?')!r})", "",
              "| stage | collected | passed | failed | errors | skipped | not run |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, counts in tests.get("stages", {}).items():
        lines.append(f"| {stage} | {counts.get('collected', '—')} | {counts['passed']} | {counts['failed']} | "
                     f"{counts['error']} | {counts['skipped']} | {counts.get('not_run', '—')} |")
    failures = tests.get("failures", [])
    if failures:
        shown = 40
        lines += ["", f"### Failures ({len(failures)}; messages in {TESTS_JSONL})", ""]
        for failure in failures[:shown]:
            message = (failure["message"].strip().splitlines() or [""])[-1][:200]
            lines.append(f"- `{failure['nodeid']}` ({failure['outcome']}): {_cell(message)}")
        if len(failures) > shown:
            lines.append(f"- ... and {len(failures) - shown} more in {TESTS_JSONL}")

    first = next((b["extra_info"] for b in (bench or {}).get("benchmarks", [])), None)
    lines += ["", "## Ceilings measured in this run", ""]
    if first is None:
        lines.append("No benchmark ran.")
    else:
        lines += ["| ceiling | measured |", "|---|---:|",
                  f"| bf16 matmul (8192³ on a GPU) | {_number(first.get('ceiling_matmul_tflops'), '.1f')} TFLOP/s |",
                  f"| device copy (1 GiB, read + write) | {_number(first.get('ceiling_copy_gbs'), '.0f')} GB/s |"]

    lines += ["", "## Targets (issue 15)", "", "| target | goal | measured | best implementation | met |",
              "|---|---:|---:|---|---|"]
    for target in evidence.get("targets", []):
        ratio = target["kind"] in ("speedup", "gram")
        spec = ".2f" if ratio else ".0%"
        goal = f"{target['goal']:.1f}x" if ratio else f"{target['goal']:.0%}"
        measured = _number(target["measured"], spec) + ("x" if ratio and target["measured"] is not None else "")
        met = {True: "yes", False: "**no**", None: "—"}[target["met"]]
        where = " ".join(x for x in (target.get("implementation"), target.get("shape")) if x) or "—"
        lines.append(f"| {target['target']} | {goal} | {measured} | {where} | {met} |")

    lines += ["", "## Dispatch thresholds derived from these rows (`bench/thresholds.py`)", ""]
    lines += _load_thresholds().render(_load_thresholds().symmetric_min_gram((bench or {}).get("benchmarks", [])))

    lines += ["", "## Benchmarks", ""]
    if bench and bench.get("benchmarks"):
        lines += ["Medians; throughput as TFLOP/s (dense Newton–Schulz FLOPs) or GB/s (the fewest bytes the step "
                  "must move), with the fraction of the ceilings above; speed-up over the plain-PyTorch baseline "
                  "of each table (torch-loop, else fastoptim-torch)."]
        lines += _load_render().render_tables(bench, level="###")
    else:
        lines.append("No benchmark results (see the bench stage above and run.log).")

    compare = evidence.get("compare", {})
    lines += ["", f"## compare (`python -m fastoptim {' '.join(compare.get('args', []))}`)", ""]
    rows = compare.get("summary", [])
    if rows:
        columns = [("optimizer", "optimizer"), ("final_validation_loss", "val loss"),
                   ("steps_to_adamw_validation_loss", "steps to AdamW's val loss"),
                   ("tokens_per_second", "tokens/s"), ("ms_per_optimizer_step", "ms/opt step"), ("status", "status")]
        lines += ["| " + " | ".join(title for _, title in columns) + " |", "|---" * len(columns) + "|"]
        for row in rows:
            cells = []
            for key, _ in columns:
                value = row.get(key, "")
                if key in ("final_validation_loss",):
                    value = _number(value, ".4f")
                elif key in ("tokens_per_second", "steps_to_adamw_validation_loss"):
                    value = _number(value, ",.0f")
                elif key == "ms_per_optimizer_step":
                    value = _number(value, ".2f")
                cells.append(_cell(value))
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No compare results (see the compare stage above).")
    lines += ["", "## Files", "", ", ".join(f"`{name}`" for name in evidence.get("files", FILES)), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The stages


class Evidence:
    """The run: its plan (budget, dry run), what each stage did, and the files under out."""

    def __init__(self, out: pathlib.Path, budget_s: float, dry_run: bool) -> None:
        self.out = out
        self.dry_run = dry_run
        self.mode = DRY if dry_run else GPU
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.data: dict = {
            "dry_run": dry_run, "budget_s": budget_s, "marks": self.mode["marks"],
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "env": {}, "stages": [], "tests": {}, "targets": [], "compare": {}, "files": list(FILES),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / TESTS_JSONL).write_text("")
        (out / RUN_LOG).write_text("")

    # ---- bookkeeping

    def log(self, text: str) -> None:
        with open(self.out / RUN_LOG, "a", encoding="utf-8") as file:
            file.write(text.rstrip() + "\n")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def limit(self, name: str) -> float:
        """Seconds this stage may run: its cap, within what is left after the later stages' reserves."""
        later = list(CAPS)[list(CAPS).index(name) + 1:]
        left = self.budget_s - self.elapsed() - MARGIN_S - GRACE_S - sum(RESERVES[s] for s in later)
        return min(CAPS[name], left)

    def child_env(self, **extra: str) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal is on the CPU even where a GPU is present
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def stage(self, name: str, command: list[str], env: dict | None = None, *, lines: int = 40) -> dict | None:
        """Run one stage's command within its limit; record it; None if no time was left to start it."""
        limit = self.limit(name)
        record = {"name": name, "limit_s": round(max(limit, 0), 1), "command": " ".join(command)}
        if limit < 5:
            record.update(status="skipped", seconds=0, note="no time left in the budget")
            self.data["stages"].append(record)
            self.log(f"== {name}: skipped, no time left")
            return None
        self.log(f"== {name} (limit {limit:.0f} s, at {self.elapsed():.0f} s): {record['command']}")
        result = run_command(command, limit, env)
        record.update(seconds=round(result["seconds"], 1), returncode=result["returncode"])
        record["status"] = "timeout" if result["timed_out"] else ("ok" if result["returncode"] == 0 else "failed")
        self.data["stages"].append(record)
        self.log(f"-- {name}: {record['status']} (exit {result['returncode']}) after {result['seconds']:.0f} s\n"
                 f"{tail(result['output'], lines)}")
        return {**result, "record": record}

    def write(self) -> None:
        """evidence.json and RESULTS.md from what has run so far (after every stage)."""
        self.data["seconds"] = round(self.elapsed(), 1)
        self.data["tests"] = summarize_tests(self.out / TESTS_JSONL)
        bench = None
        if (self.out / BENCH_JSON).exists():
            try:
                bench = json.loads((self.out / BENCH_JSON).read_text())
            except ValueError:
                bench = None
        self.data["targets"] = targets(bench)
        (self.out / EVIDENCE_JSON).write_text(json.dumps(self.data, indent=1, default=str))
        try:
            text = render_results(self.data, bench)
        except Exception as error:  # the evidence is in evidence.json either way
            text = f"# fastoptim GPU evidence\n\nRESULTS.md failed to render ({type(error).__name__}: {error}); " \
                   f"see {EVIDENCE_JSON}.\n"
        (self.out / RESULTS_MD).write_text(text)

    # ---- stages

    def run_info(self) -> None:
        result = self.stage("info", [sys.executable, str(pathlib.Path(__file__).resolve()), "--probe"],
                            self.child_env())
        env = self.data["env"]
        if result is not None:
            for line in reversed(result["output"].splitlines()):
                if line.startswith("{"):
                    try:
                        env.update(json.loads(line))
                    except ValueError:
                        pass
                    break
            if "torch" not in env:
                result["record"]["note"] = "the probe printed no versions"
        env["driver"], env["nvidia_smi"] = nvidia_smi()
        env["nvcc"] = nvcc_version()
        env["commit"] = os.environ.get("EVIDENCE_COMMIT") or git_commit()
        info = run_command([sys.executable, "-m", "fastoptim", "info"], 60, self.child_env())
        env["fastoptim_info"] = info["output"].strip()
        self.log(f"-- fastoptim info\n{info['output'].strip()}")

    def run_build(self) -> None:
        if self.dry_run:  # no extension on the CPU: setup.py only reports its version (the same plumbing)
            command = [sys.executable, "setup.py", "--version"]
            env = self.child_env(FASTOPTIM_CUDA="0")
        else:
            command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                       "-e", "."]
            env = self.child_env(FASTOPTIM_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0a", MAX_JOBS=str(os.cpu_count() or 1))
        result = self.stage("build", command, env, lines=10)
        if result is None:
            return
        header = f"$ {result['record']['command']}\n(exit {result['returncode']}, {result['seconds']:.0f} s)\n"
        (self.out / BUILD_LOG).write_text(header + short_build_log(result["output"]) + "\n")
        if self.dry_run:
            result["record"]["note"] = "dry run: the extension is not built (CPU)"
            return
        # The extension imports, was built against the torch that runs it, and holds sm_90a code.
        check = run_command([sys.executable, "-c", BUILD_CHECK], 60, self.child_env())
        if check["returncode"] != 0:
            result["record"]["status"] = "failed"
            result["record"]["note"] = "fastoptim._C does not load: " + tail(check["output"], 1)
            return
        arches = list_elf_arches(check["output"].strip().splitlines()[-1])
        result["record"]["note"] = "cubins: " + (", ".join(arches) or "unknown (no cuobjdump)")
        if arches and "sm_90a" not in arches:
            result["record"]["status"] = "failed"

    def run_tests(self, name: str, files: list[str], done: bool) -> None:
        env = self.child_env(
            EVIDENCE_RESULTS=str(self.out / TESTS_JSONL), EVIDENCE_STAGE=name,
            PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
        )
        if not self.dry_run:
            env["FASTOPTIM_CUDA"] = "1"  # the build checks of the tests then expect the extension
        if done:
            env["EVIDENCE_DONE"] = str(self.out / TESTS_JSONL)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "evidence_plugin",
                   "-o", "addopts=", "-m", self.mode["marks"], "--tb=line", "-rfE"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            command.append(f"--timeout={PER_TEST_TIMEOUT_S}")
        command += [f"--ignore={path}" for path in NOT_ON_GPU] + files
        result = self.stage(name, command, env, lines=30)
        if result is not None:
            counts = summarize_tests(self.out / TESTS_JSONL)["stages"].get(name, {})
            result["record"]["note"] = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in
                                                 ("collected", "passed", "failed", "error", "skipped", "not_run")
                                                 if counts.get(k))
            if result["returncode"] == 5:  # pytest: nothing collected, e.g. everything ran in an earlier stage
                result["record"]["status"] = "ok"

    def run_bench(self) -> None:
        shapes = " or ".join(self.mode["ns_shapes"])
        selection = (f"(test_newton_schulz and ({shapes} or gpt2)) or test_normuon_step or test_sophia_step "
                     "or test_optimizer_step")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *BENCH_FILES,
                   "-k", selection, "--benchmark-enable", f"--benchmark-json={self.out / BENCH_JSON}",
                   "--benchmark-columns=median,rounds", *self.mode["bench_options"]]
        result = self.stage("bench", command, self.child_env(), lines=60)
        if result is not None and (self.out / BENCH_JSON).exists():
            try:
                rows = len(json.loads((self.out / BENCH_JSON).read_text()).get("benchmarks", []))
            except ValueError:
                rows = 0
            result["record"]["note"] = f"{rows} rows"

    def run_compare(self) -> None:
        args = ["compare", *self.mode["compare"]]
        self.data["compare"] = {"args": args}
        with tempfile.TemporaryDirectory(prefix="evidence-compare-") as folder:
            result = self.stage("compare", [sys.executable, "-m", "fastoptim", *args, "--out", folder],
                                self.child_env(), lines=25)
            results_json, summary_csv = pathlib.Path(folder) / "results.json", pathlib.Path(folder) / "summary.csv"
            if results_json.exists():
                shutil.copyfile(results_json, self.out / COMPARE_JSON)
            if summary_csv.exists():
                with open(summary_csv, newline="", encoding="utf-8") as file:
                    self.data["compare"]["summary"] = list(csv.DictReader(file))
        if result is not None and not self.data["compare"].get("summary"):
            result["record"]["note"] = "no summary.csv"

    def run(self) -> int:
        steps = [
            ("info", self.run_info),
            ("build", self.run_build),
            ("tests", lambda: self.run_tests("tests", list(PRIORITY_TESTS), done=False)),
            ("bench", self.run_bench),
            ("compare", self.run_compare),
            ("tests-rest", lambda: self.run_tests("tests-rest", self.mode["rest"], done=True)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as error:  # a stage's bookkeeping must not cost the others their results
                self.data["stages"].append({"name": name, "status": "error", "seconds": 0,
                                            "note": f"{type(error).__name__}: {error}"})
                self.log(f"!! {name}: {type(error).__name__}: {error}")
            self.write()
        files = sorted(p.name for p in self.out.iterdir())
        self.data["files"] = files
        self.write()
        if len(files) > MAX_FILES:
            print(f"error: {len(files)} files under {self.out}, more than {MAX_FILES}: {files}", file=sys.stderr)
            return 2
        print(summary_text(self.data))
        return 0


def summary_text(data: dict) -> str:
    """A few lines for the end of the terminal output (a lent machine's reply carries only the tail)."""
    lines = [f"fastoptim GPU evidence ({'dry run, ' if data['dry_run'] else ''}{data['env'].get('gpu') or 'no GPU'})"
             f": {data['seconds']:.0f} s of {data['budget_s']} s"]
    for stage in data["stages"]:
        lines.append(f"  {stage['name']:<11} {stage['status']:<8} {_number(stage.get('seconds'), '5.0f')} s  "
                     f"{stage.get('note') or ''}")
    for target in data["targets"]:
        measured = _number(target["measured"], ".2f")
        lines.append(f"  target: {target['target']}: {measured} (goal {target['goal']}) met={target['met']}")
    failures = data["tests"].get("failures", [])
    lines += [f"  FAILED {f['nodeid']}" for f in failures[:15]]
    if len(failures) > 15:
        lines.append(f"  ... {len(failures) - 15} more failures")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The machine


def probe() -> dict:
    """Versions and the GPU, printed as one JSON line by `--probe` (run as its own process: a broken CUDA
    set-up fails there, not in the orchestrator)."""
    import torch

    sys.path.insert(0, str(BENCH))
    import benchutil

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                  "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import fastoptim
    from fastoptim import backends

    info["fastoptim"] = fastoptim.__version__
    info["backends"] = {name: {"available": status.available, "reason": status.reason}
                        for name, status in backends.available().items()}
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30, l2_mib=getattr(props, "L2_cache_size", 0) / 2**20)
    if benchutil.torch_optim_muon_ns() is not None:
        info["torch_optim_muon"] = "torch.optim._muon._zeropower_via_newtonschulz"
    elif hasattr(torch.optim, "Muon"):
        info["torch_optim_muon"] = "whole torch.optim.Muon steps (the private helper is unusable here)"
    else:
        info["torch_optim_muon"] = f"none (torch {torch.__version__} has no torch.optim.Muon)"
    return info


def nvidia_smi() -> tuple[str | None, str | None]:
    """(driver version, one CSV line of the GPU's name, memory, clocks and power limit)."""
    if shutil.which("nvidia-smi") is None:
        return None, None
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    result = run_command(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], 30)
    line = result["output"].strip().splitlines()[0] if result["returncode"] == 0 and result["output"].strip() else ""
    fields = [f.strip() for f in line.split(",")]
    return (fields[1] if len(fields) > 1 else None), (f"{query}: {line}" if line else None)


def nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    result = run_command([nvcc, "--version"], 30)
    release = [line for line in result["output"].splitlines() if "release" in line]
    return release[-1].split("release")[-1].strip() if release else None


def git_commit() -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    result = run_command(["git", "rev-parse", "--short=12", "HEAD"], 10)
    return result["output"].strip() or None if result["returncode"] == 0 else None


def cuobjdump() -> str | None:
    """cuobjdump from PATH or the CUDA toolkit, else the one triton's package carries."""
    found = shutil.which("cuobjdump") or next(
        (p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.path.exists(p)), None)
    if found is None and importlib.util.find_spec("triton") is not None:
        bundled = pathlib.Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


def list_elf_arches(so_file: str) -> list[str]:
    """The distinct sm_XX targets of the cubins embedded in a shared object, e.g. ['sm_90a']."""
    tool = cuobjdump()
    if tool is None:
        return []
    result = run_command([tool, "--list-elf", so_file], 60)
    arches = {part.split(".")[-2] for part in result["output"].split() if part.endswith(".cubin")}
    return sorted(arches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "gpu",
                        help="the folder for the result files (at most 8)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU rehearsal: tiny shapes, no build (also GPU_DRY_RUN=1)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    dry_run = args.dry_run or os.environ.get("GPU_DRY_RUN", "0") not in ("", "0")
    return Evidence(args.out.resolve(), args.budget, dry_run).run()


if __name__ == "__main__":
    raise SystemExit(main())
