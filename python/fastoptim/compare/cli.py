"""`python -m fastoptim compare`: argument parsing and the runs over seeds and optimizers."""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from . import data, report
from .train import (
    DISPLAY_NAMES,
    KNOBS,
    OPTIMIZERS,
    PRESETS,
    Experiment,
    Hyperparameters,
    Preset,
    RunResult,
    train,
)

ALIASES = {"sophiag": "sophia"}


def optimizer_list(text: str) -> list[str]:
    """argparse type of --optimizers: a comma-separated list of known names, in the order given."""
    names = [ALIASES.get(t.strip().lower(), t.strip().lower()) for t in text.split(",") if t.strip()]
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


def knob_setting(text: str) -> tuple[str, str, list[float]]:
    """argparse type of --set / --grid: OPTIMIZER.KNOB=VALUE[,VALUE...] -> (optimizer, knob, values)."""
    target, sep, values_text = text.partition("=")
    optimizer, dot, knob = target.strip().lower().partition(".")
    optimizer = ALIASES.get(optimizer, optimizer)
    if not sep or not dot:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER.KNOB=VALUE[,VALUE...], got {text!r}")
    if optimizer not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if knob not in KNOBS[optimizer]:
        raise argparse.ArgumentTypeError(
            f"{DISPLAY_NAMES[optimizer]} has no knob {knob!r}; its knobs: {', '.join(KNOBS[optimizer])}"
        )
    values = []
    for item in values_text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{optimizer}.{knob}: expected numbers, got {item!r}") from None
        # grad_clip 0 means no clipping; every other knob must be positive, beta2 below 1
        if not math.isfinite(value) or value < 0 or (value == 0 and knob != "grad_clip"):
            raise argparse.ArgumentTypeError(f"{optimizer}.{knob}: expected a positive finite number, got {item!r}")
        if knob in ("beta2", "warmup_fraction") and value >= 1:
            raise argparse.ArgumentTypeError(f"{optimizer}.{knob}: expected a value below 1, got {item!r}")
        values.append(value)
    return optimizer, knob, values


def single_knob_setting(text: str) -> tuple[str, str, list[float]]:
    """argparse type of --set: OPTIMIZER.KNOB=VALUE, one value."""
    optimizer, knob, values = knob_setting(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{optimizer}.{knob}: give one value, got {len(values)}")
    return optimizer, knob, values


def add_common_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The options `compare` and `sweep` share."""
    parser.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(OPTIMIZERS),
        help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--steps", type=positive_int, help="training steps per run (default: the preset's)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="model init, data order and sampling (default 0; the first with --seeds)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch (default 1 on CPU: the matrices are small, and intra-op threads "
        "slow down badly when the cores are shared)",
    )
    parser.add_argument("--out", type=Path, help=f"output folder (default: runs/{what}-<timestamp>)")
    parser.add_argument(
        "--quick", action="store_true", help="the tiny model and budget of the quick preset"
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "compare")
    for name in OPTIMIZERS:
        parser.add_argument(
            f"--lr-{name}", type=positive_float, help=f"peak learning rate of {DISPLAY_NAMES[name]} (--set {name}.lr=)"
        )
    parser.add_argument(
        "--set",
        dest="settings",
        type=single_knob_setting,
        action="append",
        default=[],
        metavar="OPTIMIZER.KNOB=VALUE",
        help="override one knob of the preset, e.g. --set muon.adamw_lr=4e-3 --set adamw.grad_clip=0 "
        f"(knobs: {'; '.join(f'{o}: {chr(44).join(k)}' for o, k in KNOBS.items())})",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="repeat the comparison over this many seeds (--seed, --seed+1, ...): the table then shows "
        "mean ± sd (sample standard deviation) over seeds (default 1)",
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


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: Callable | None = None) -> int:
    """Run `command(args, device, out)` (default: the comparison) with the device, threads and --out
    checked first."""
    device = resolve_device(parser, args.device)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" or args.threads:
            torch.set_num_threads(args.threads or 1)
        out = output_folder(parser, args.out, "sweep" if command is not None else "compare")
        return (command or _compare)(args, device, out)
    finally:
        torch.set_num_threads(threads)  # cli.main may be called in-process (tests): leave torch as found


def preset_for(args: argparse.Namespace, device: torch.device) -> tuple[str, Preset, int]:
    """The preset's name, the preset (its evaluation cadence capped by the steps), and the steps."""
    name = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    steps = args.steps or preset.steps
    return name, replace(preset, eval_every=min(preset.eval_every, steps)), steps


def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Device and versions, recorded with every result."""
    import fastoptim

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {
            "fastoptim": fastoptim.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def output_folder(parser: argparse.ArgumentParser, out: Path | None, what: str = "compare") -> Path:
    """--out (or runs/<what>-<timestamp>), created and checked writable: a usage error (exit 2) if not."""
    out = out or Path("runs") / time.strftime(f"{what}-%Y%m%d-%H%M%S")
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
def uninterrupted() -> Iterator[None]:
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


def hyperparameters_for(args: argparse.Namespace, preset: Preset) -> dict[str, Hyperparameters]:
    """The preset's knobs with --set and --lr-<name> applied (--lr-<name> last)."""
    chosen = dict(preset.hyperparameters)
    for optimizer, knob, values in args.settings:
        chosen[optimizer] = chosen[optimizer].with_values(**{knob: values[0]})
    for name in OPTIMIZERS:
        lr = getattr(args, f"lr_{name}", None)
        if lr is not None:
            chosen[name] = chosen[name].with_values(lr=lr)
    return chosen


def _compare(args: argparse.Namespace, device: torch.device, out: Path) -> int:
    preset_name, preset, steps = preset_for(args, device)
    knobs = hyperparameters_for(args, preset)
    seeds = [args.seed + i for i in range(args.seeds)]
    split = data.train_validation_split(data.corpus_tokens())
    experiments: dict[int, Experiment] = {}

    def experiment(seed: int) -> Experiment:  # built when its seed's first run starts
        if seed not in experiments:
            experiments[seed] = Experiment(preset, steps, seed, device, split, args.schedule, args.phi)
        return experiments[seed]

    first = experiment(seeds[0])
    config = {
        "preset": preset_name,
        "model": preset.model.to_dict(),
        "parameters": first.new_model().num_parameters(),
        "steps": steps,
        "batch_size": preset.batch_size,
        "tokens_per_step": first.tokens_per_step,
        "eval_every": preset.eval_every,
        "eval_batches": preset.eval_batches,
        "seed": args.seed,
        "seeds": seeds,
        "lr_schedule": args.schedule,
        "phi": args.phi,
        "hyperparameters": {name: knobs[name].knobs(name) for name in args.optimizers},
        "corpus": {
            "name": data.CORPUS_NAME,
            "train_tokens": len(split.train),
            "validation_tokens": len(split.validation),
        },
        **environment(device),
    }
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]} (mean ± sd)"
    title = (
        f"fastoptim compare: {config['parameters'] / 1e6:.2f}M-parameter byte-level GPT on Jane Austen, "
        f"{steps} steps x {first.tokens_per_step} tokens, {seed_text}, {device}"
    )
    print(title)
    print(f"writing results to {out}")

    runs: list[RunResult] = []
    failures = 0
    try:
        with progress_reporter(len(args.optimizers) * len(seeds)) as start:
            for seed in seeds:
                for name in args.optimizers:
                    result = RunResult(name, "", knobs[name], steps, seed=seed)
                    runs.append(result)
                    try:
                        train(experiment(seed), result, on_step=start(result))
                    except (RuntimeError, TypeError, ValueError) as error:
                        # An optimizer that cannot be built here (missing from this fastoptim) must not cost the rest.
                        result.status = f"error: {error}"
                        failures += 1
                        print(f"{result.name} failed: {error}", file=sys.stderr)
                    with uninterrupted():
                        report.write_all(out, runs, config, title)
    except KeyboardInterrupt:  # at any moment: in a run, between runs, or held back during a write
        for result in runs:
            if result.status == "running":
                result.status = "interrupted"
        with uninterrupted():
            report.write_all(out, runs, config, title)
        print(report.render_table(runs, title))
        print(f"interrupted: results of what finished are in {out}", file=sys.stderr)
        return 130
    print(report.render_table(runs, title))
    for path in report.OUTPUT_FILES:
        print(f"  {out / path}")
    return 1 if failures else 0
