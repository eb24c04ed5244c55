"""`python -m fastoptim compare`: argument parsing and the run over optimizers."""

from __future__ import annotations

import argparse
import math
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from . import data, report
from .train import DISPLAY_NAMES, OPTIMIZERS, PRESETS, Experiment, RunResult, train


def optimizer_list(text: str) -> list[str]:
    """argparse type of --optimizers: a comma-separated list of known names, in the order given."""
    aliases = {"sophiag": "sophia"}
    names = [aliases.get(t.strip().lower(), t.strip().lower()) for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one optimizer")
    for name in names:
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an optimizer is listed twice: {text!r}")
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(OPTIMIZERS),
        help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--steps", type=positive_int, help="training steps per optimizer (default: the preset's)"
    )
    for name in OPTIMIZERS:
        extra = " (also the AdamW part of Muon/NorMuon: embeddings, head, norms)" if name == "adamw" else ""
        parser.add_argument(
            f"--lr-{name}", type=positive_float, help=f"peak learning rate of {DISPLAY_NAMES[name]}{extra}"
        )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda, cuda:N"
    )
    parser.add_argument("--seed", type=int, default=0, help="model init, data order and sampling (default 0)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch (default 1 on CPU: the matrices are small, and intra-op threads "
        "slow down badly when the cores are shared)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/compare-<timestamp>)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and budget: well under a minute on a CPU"
    )
    parser.add_argument(
        "--schedule",
        choices=("cosine", "uba", "wsd"),
        default="cosine",
        help="learning-rate shape after the 5%% warm-up, decaying to 10%% (fastoptim.schedules; default cosine)",
    )
    parser.add_argument(
        "--phi",
        type=positive_float,
        default=2.0,
        help="UBA's phi with --schedule uba (2 = cosine; smaller holds the peak longer, larger decays earlier)",
    )


def resolve_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        parser.error(f"argument --device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {text!r} requested but no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: expected cpu or cuda, got {text!r}")
    return device


@contextmanager
def progress_reporter(total_runs: int) -> Iterator:
    """Yields `start(run) -> on_step(run, loss)`: a rich progress bar per optimizer, else plain lines."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:

        def start_plain(run: RunResult):
            every = max(1, run.steps_planned // 10)

            def on_step(run: RunResult, loss: float) -> None:
                if run.steps_done % every == 0 or run.steps_done == run.steps_planned:
                    print(
                        f"  {run.name:<8} step {run.steps_done}/{run.steps_planned}  loss {loss:.4f}",
                        file=sys.stderr,
                    )

            return on_step

        yield start_plain
        return
    columns = (
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:

        def start(run: RunResult):
            task = progress.add_task(run.name, total=run.steps_planned, loss="—")

            def on_step(run: RunResult, loss: float) -> None:
                progress.update(task, completed=run.steps_done, loss=f"{loss:.4f}")

            return on_step

        yield start


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = resolve_device(parser, args.device)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" or args.threads:
            torch.set_num_threads(args.threads or 1)
        return _compare(args, device, _output_folder(parser, args.out))
    finally:
        torch.set_num_threads(threads)  # cli.main may be called in-process (tests): leave torch as found


def _output_folder(parser: argparse.ArgumentParser, out: Path | None) -> Path:
    """--out (or runs/compare-<timestamp>), created and checked writable: a usage error (exit 2) if not."""
    out = out or Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        parser.error(f"--out {out}: exists and is not a folder")
    except OSError as error:
        parser.error(f"--out {out}: cannot create the folder ({error.strerror or error})")
    try:  # root passes os.access everywhere: try a real write
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot write there ({error.strerror or error})")
    return out


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back while result files are written (each is atomic already: temp file + rename), then
    deliver it: an interrupt never leaves a run's results half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def _compare(args: argparse.Namespace, device: torch.device, out: Path) -> int:
    preset_name = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    steps = args.steps or preset.steps
    preset = replace(preset, eval_every=min(preset.eval_every, steps))
    rates = {name: getattr(args, f"lr_{name}") or preset.learning_rates[name] for name in OPTIMIZERS}

    tokens = data.corpus_tokens()
    experiment = Experiment(
        preset, steps, args.seed, device, data.train_validation_split(tokens), args.schedule, args.phi
    )
    import fastoptim

    config = {
        "preset": preset_name,
        "model": preset.model.to_dict(),
        "parameters": experiment.new_model().num_parameters(),
        "steps": steps,
        "batch_size": preset.batch_size,
        "tokens_per_step": experiment.tokens_per_step,
        "eval_every": preset.eval_every,
        "eval_batches": preset.eval_batches,
        "seed": args.seed,
        "lr_schedule": args.schedule,
        "phi": args.phi,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "learning_rates": {name: rates[name] for name in args.optimizers},
        "corpus": {
            "name": data.CORPUS_NAME,
            "train_tokens": len(experiment.split.train),
            "validation_tokens": len(experiment.split.validation),
        },
        "versions": {
            "fastoptim": fastoptim.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    title = (
        f"fastoptim compare: {config['parameters'] / 1e6:.2f}M-parameter byte-level GPT on Jane Austen, "
        f"{steps} steps x {experiment.tokens_per_step} tokens, {device}"
    )
    print(title)
    print(f"writing results to {out}")

    runs: list[RunResult] = []
    failures = 0
    try:
        with progress_reporter(len(args.optimizers)) as start:
            for name in args.optimizers:
                result = RunResult(name, "", rates[name], rates["adamw"], steps)
                runs.append(result)
                try:
                    train(experiment, result, on_step=start(result))
                except (RuntimeError, TypeError, ValueError) as error:
                    # An optimizer that cannot be built here (missing from this fastoptim) must not cost the rest.
                    result.status = f"error: {error}"
                    failures += 1
                    print(f"{result.name} failed: {error}", file=sys.stderr)
                with _uninterrupted():
                    report.write_all(out, runs, config, title)
    except KeyboardInterrupt:  # at any moment: in a run, between runs, or held back during a write
        for result in runs:
            if result.status == "running":
                result.status = "interrupted"
        with _uninterrupted():
            report.write_all(out, runs, config, title)
        print(report.render_table(runs, title))
        print(f"interrupted: results of what finished are in {out}", file=sys.stderr)
        return 130
    print(report.render_table(runs, title))
    for path in (report.RESULTS_JSON, report.SUMMARY_CSV, report.CURVES_CSV, report.PLOT_PNG):
        print(f"  {out / path}")
    return 1 if failures else 0
