"""`python -m fastoptim sweep`: the tuning behind `compare`'s presets, reproducible on a small grid.

Coordinate-wise search, per optimizer: start from `GRID_START`, then for each (knob, values) pass of
its grid train one run per value with the other knobs at the best found so far, and keep the value
with the lowest final validation loss (a knob may have two passes: SophiaG's lr is searched again
after rho, since rho rescales its steps). Runs with the same knobs are trained once. Every optimizer
is tuned on its own knobs (`train.KNOBS`), on the preset's model, budget, seed and data.

Writes, after every run (atomically; Ctrl-C keeps what finished): `sweep.md` (the table and the best
knobs), `sweep.csv`, `sweep.json`. The presets in `train.PRESETS` are the best knobs of such a run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, report
from .cli import add_common_arguments, environment, knob_setting, preset_for, uninterrupted
from .train import DISPLAY_NAMES, KNOBS, Experiment, Hyperparameters, RunResult, train

SWEEP_MD = "sweep.md"
SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"

# Where each search starts: the common defaults (AdamW betas (0.9, 0.95), 5% warm-up, clipping at 1.0)
# and each optimizer's customary rate; SophiaG at the official rho.
GRID_START = {
    "adamw": Hyperparameters(lr=2e-3),
    "muon": Hyperparameters(lr=0.02, adamw_lr=2e-3),
    "normuon": Hyperparameters(lr=0.02, adamw_lr=2e-3),
    "sophia": Hyperparameters(lr=5e-4, rho=0.04),
}
_MUON_GRID = (("lr", (0.01, 0.02, 0.04, 0.08)), ("adamw_lr", (2e-3, 4e-3, 8e-3)), ("grad_clip", (0.0, 1.0)))
GRIDS: dict[str, dict[str, tuple[tuple[str, tuple[float, ...]], ...]]] = {
    "cpu": {
        "adamw": (
            ("lr", (1e-3, 2e-3, 4e-3, 8e-3)),
            ("beta2", (0.95, 0.99, 0.999)),
            ("warmup_fraction", (0.02, 0.05, 0.1, 0.2)),
            ("grad_clip", (0.0, 1.0)),
        ),
        "muon": _MUON_GRID,
        "normuon": _MUON_GRID,
        "sophia": (
            ("lr", (2.5e-4, 5e-4, 1e-3, 2e-3)),
            ("rho", (0.04, 0.2, 1.0, 5.0)),
            ("lr", (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)),
            ("grad_clip", (0.0, 1.0)),
        ),
    },
}
GRIDS["quick"] = GRIDS["cuda"] = GRIDS["cpu"]


@dataclass
class Trial:
    """One run of the sweep: which pass asked for it, its knobs, and what it measured."""

    optimizer: str
    knob: str  # the knob this pass varies ("start" for the starting point)
    hyperparameters: Hyperparameters
    result: RunResult | None = None

    def row(self) -> dict:
        run = self.result
        return {
            "optimizer": DISPLAY_NAMES[self.optimizer],
            "pass": self.knob,
            **self.hyperparameters.knobs(self.optimizer),
            "final_validation_loss": None if run is None else run.final_validation_loss,
            "final_train_loss": None if run is None else run.final_train_loss,
            "sophia_clipped_fraction": None if run is None else run.sophia_clipped_fraction,
            "status": "not run" if run is None else run.status,
        }


@dataclass
class Search:
    """The coordinate-wise search of one optimizer."""

    optimizer: str
    grid: tuple[tuple[str, tuple[float, ...]], ...]
    best: Hyperparameters
    trials: list[Trial] = field(default_factory=list)

    def loss(self, knobs: Hyperparameters) -> float | None:
        for trial in self.trials:
            if trial.hyperparameters == knobs and trial.result is not None and trial.result.status == "finished":
                value = trial.result.final_validation_loss
                return value if value is not None and math.isfinite(value) else None
        return None


def _score(loss: float | None) -> float:
    return math.inf if loss is None else loss


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "sweep")
    parser.add_argument(
        "--grid",
        dest="grid",
        type=knob_setting,
        action="append",
        default=[],
        metavar="OPTIMIZER.KNOB=V1,V2,...",
        help="search these values of this knob; the knobs given for an optimizer replace its whole default "
        "grid, in the order given (e.g. --grid adamw.lr=1e-3,2e-3 --grid adamw.beta2=0.95,0.99)",
    )


def grids_for(args: argparse.Namespace, preset_name: str) -> dict[str, tuple]:
    chosen: dict[str, list] = {}
    for optimizer, knob, values in args.grid:
        chosen.setdefault(optimizer, []).append((knob, tuple(values)))
    return {name: tuple(chosen.get(name, GRIDS[preset_name][name])) for name in args.optimizers}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this sweep (threads and --out aside)."""
    parts = ["python -m fastoptim sweep"]
    if args.quick:
        parts.append("--quick")
    if args.steps:
        parts.append(f"--steps {args.steps}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.optimizers != list(KNOBS):
        parts.append("--optimizers " + ",".join(args.optimizers))
    if args.schedule != "cosine":
        parts.append(f"--schedule {args.schedule} --phi {args.phi:g}")
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    parts += [f"--grid {o}.{k}=" + ",".join(f"{v:g}" for v in values) for o, k, values in args.grid]
    return " ".join(parts)


def sweep(args: argparse.Namespace, device: torch.device, out: Path) -> int:
    """The command: run every search, writing the table after each run. Exit 130 on Ctrl-C, 1 if a run
    failed to build, else 0."""
    preset_name, preset, steps = preset_for(args, device)
    grids = grids_for(args, preset_name)
    experiment = Experiment(
        preset, steps, args.seed, device, data.train_validation_split(data.corpus_tokens()), args.schedule, args.phi
    )
    config = {
        "preset": preset_name,
        "steps": steps,
        "seed": args.seed,
        "tokens_per_step": experiment.tokens_per_step,
        "eval_every": preset.eval_every,
        "lr_schedule": args.schedule,
        "phi": args.phi,
        "grids": {name: [[knob, list(values)] for knob, values in grid] for name, grid in grids.items()},
        "start": {name: GRID_START[name].knobs(name) for name in grids},
        "command": command_line(args),
        **environment(device),
    }
    searches = [Search(name, grid, GRID_START[name]) for name, grid in grids.items()]
    print(f"fastoptim sweep: preset {preset_name}, {steps} steps, seed {args.seed}, {device}; writing to {out}")
    failures = 0
    try:
        for search in searches:
            for knob, values in (("start", ()), *search.grid):
                candidates = [search.best.with_values(**{knob: v}) for v in values] if values else [search.best]
                for knobs in candidates:
                    if any(trial.hyperparameters == knobs for trial in search.trials):
                        continue  # trained already (the current best, or a value of an earlier pass)
                    trial = Trial(search.optimizer, knob, knobs)
                    search.trials.append(trial)
                    trial.result = RunResult(search.optimizer, "", knobs, steps, seed=args.seed)
                    try:
                        train(experiment, trial.result)
                    except (RuntimeError, TypeError, ValueError) as error:
                        trial.result.status = f"error: {error}"
                        failures += 1
                    loss = trial.result.final_validation_loss
                    print(
                        f"  {DISPLAY_NAMES[search.optimizer]:<8} {report.knob_text(trial.result):<50} "
                        f"val {loss if loss is None else round(loss, 4)}  {trial.result.status}"
                    )
                    with uninterrupted():
                        write_sweep(out, searches, config)
                if knob != "start":
                    search.best = min(candidates, key=lambda k: _score(search.loss(k)))
                with uninterrupted():
                    write_sweep(out, searches, config)
    except KeyboardInterrupt:
        for search in searches:
            for trial in search.trials:
                if trial.result is not None and trial.result.status == "running":
                    trial.result.status = "interrupted"
        with uninterrupted():
            write_sweep(out, searches, config)
        print(f"interrupted: the finished runs are in {out}", file=sys.stderr)
        return 130
    print(render_best(searches))
    for name in (SWEEP_MD, SWEEP_CSV, SWEEP_JSON):
        print(f"  {out / name}")
    return 1 if failures else 0


def best_rows(searches: list[Search]) -> list[dict]:
    rows = []
    for search in searches:
        rows.append(
            {
                "optimizer": DISPLAY_NAMES[search.optimizer],
                "knobs": search.best.knobs(search.optimizer),
                "final_validation_loss": search.loss(search.best),
                "runs": len(search.trials),
            }
        )
    return rows


def render_best(searches: list[Search]) -> str:
    lines = ["best knobs (lowest final validation loss):"]
    for row in best_rows(searches):
        knobs = ", ".join(f"{k}={v:g}" for k, v in row["knobs"].items())
        loss = report.DASH if row["final_validation_loss"] is None else f"{row['final_validation_loss']:.4f}"
        lines.append(f"  {row['optimizer']:<8} {knobs}  (val {loss}, {row['runs']} runs)")
    return "\n".join(lines)


def render_markdown(searches: list[Search], config: dict) -> str:
    lines = [
        f"# fastoptim sweep: preset {config['preset']}, {config['steps']} steps, seed {config['seed']}",
        "",
        f"`{config['command']}` — {config['date']}, {config['device']} ({config['device_name']}), "
        f"{config['threads']} torch thread(s), torch {config['versions']['torch']}.",
        "Coordinate-wise: each pass varies one knob with the others at the best so far; **bold** = kept.",
        "",
    ]
    for search in searches:
        names = list(KNOBS[search.optimizer])
        lines += [
            f"## {DISPLAY_NAMES[search.optimizer]}",
            "",
            "| pass | " + " | ".join(names) + " | val loss | train loss | SophiaG clipped | status |",
            "|---|" + "---:|" * (len(names) + 3) + "---|",
        ]
        best_loss = search.loss(search.best)
        for trial in search.trials:
            row = trial.row()
            bold = trial.hyperparameters == search.best and best_loss is not None
            cells = [f"{row[name]:g}" for name in names]
            loss = report.DASH if row["final_validation_loss"] is None else f"{row['final_validation_loss']:.4f}"
            if bold:
                loss = f"**{loss}**"
            train_loss = report.DASH if row["final_train_loss"] is None else f"{row['final_train_loss']:.4f}"
            clipped = row["sophia_clipped_fraction"]
            clipped = report.DASH if clipped is None else f"{100 * clipped:.1f}%"
            tail = f" | {loss} | {train_loss} | {clipped} | {row['status']} |"
            lines.append(f"| {trial.knob} | " + " | ".join(cells) + tail)
        lines.append("")
    lines += ["## Best", "", "```", render_best(searches), "```", ""]
    return "\n".join(lines)


def write_sweep(out: Path, searches: list[Search], config: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    trials = [trial for search in searches for trial in search.trials]
    rows = [trial.row() for trial in trials]
    header = ["optimizer", "pass", *dict.fromkeys(k for s in searches for k in KNOBS[s.optimizer])]
    header += ["final_validation_loss", "final_train_loss", "sophia_clipped_fraction", "status"]
    csv_path, json_path, md_path = out / SWEEP_CSV, out / SWEEP_JSON, out / SWEEP_MD
    report._atomic_write(csv_path, report._csv_text(header, [[row.get(k) for k in header] for row in rows]))
    payload = {
        "config": config,
        "best": best_rows(searches),
        "trials": rows,
        "runs": [trial.result.to_dict() for trial in trials if trial.result is not None],
    }
    report._atomic_write(json_path, json.dumps(payload, indent=2, allow_nan=True))
    report._atomic_write(md_path, render_markdown(searches, config))
    return [md_path, csv_path, json_path]
