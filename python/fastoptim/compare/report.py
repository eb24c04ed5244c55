"""Report a comparison: a table on the terminal, loss curves as PNG, the raw numbers as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .train import HYPERPARAMETER_NAMES, KNOBS, RunResult, steps_to_reach

RESULTS_JSON = "results.json"
SUMMARY_CSV = "summary.csv"
AGGREGATE_CSV = "aggregate.csv"
CURVES_CSV = "curves.csv"
SUMMARY_MD = "summary.md"
PLOT_PNG = "loss_curves.png"
OUTPUT_FILES = (RESULTS_JSON, SUMMARY_CSV, AGGREGATE_CSV, CURVES_CSV, SUMMARY_MD, PLOT_PNG)
logger = logging.getLogger(__name__)
DASH = "—"

COLUMNS = (
    "optimizer",
    "knobs",
    "train loss",
    "val loss",
    "steps to AdamW's val loss",
    "tokens/s",
    "ms/opt step",
    "opt state",
    "SophiaG clipped",
    "status",
)


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator); sd is None below two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def adamw_targets(runs: Sequence[RunResult]) -> dict[int, float]:
    """Per seed, AdamW's final validation loss: the target of the "training efficiency" column (each
    optimizer is measured against AdamW of its own seed, where that AdamW run finished)."""
    return {
        run.seed: run.final_validation_loss
        for run in runs
        if run.optimizer == "adamw" and run.status == "finished" and run.final_validation_loss is not None
    }


def adamw_target(runs: Sequence[RunResult]) -> float | None:
    """The mean of `adamw_targets` over seeds (None if no AdamW run finished)."""
    return mean_sd(list(adamw_targets(runs).values()))[0]


KNOB_LABELS = {"adamw_lr": "adamw lr", "warmup_fraction": "warm-up", "grad_clip": "clip"}


def knob_text(run: RunResult) -> str:
    """The knobs `run`'s optimizer reads, short: "lr 0.002, beta2 0.99, warm-up 0.1, clip 1"."""
    knobs = run.hyperparameters.knobs(run.optimizer) if run.optimizer in KNOBS else {}
    return ", ".join(f"{KNOB_LABELS.get(name, name)} {value:g}" for name, value in knobs.items())


def summary_rows(runs: Sequence[RunResult]) -> list[dict]:
    """One dict of plain numbers per run (None where there is nothing to report); knobs an optimizer does
    not read are None."""
    targets = adamw_targets(runs)
    rows = []
    for run in runs:
        target = targets.get(run.seed)
        reached = steps_to_reach(run, target) if target is not None else None
        read = KNOBS.get(run.optimizer, ())
        rows.append(
            {
                "optimizer": run.name,
                "seed": run.seed,
                "implementation": run.implementation,
                **{name: getattr(run.hyperparameters, name) if name in read else None for name in HYPERPARAMETER_NAMES},
                "steps_planned": run.steps_planned,
                "steps_done": run.steps_done,
                "final_train_loss": run.final_train_loss,
                "final_validation_loss": run.final_validation_loss,
                "steps_to_adamw_validation_loss": reached,
                "fraction_of_adamw_steps": None if reached is None else reached / run.steps_planned,
                "adamw_validation_loss_target": target,
                "tokens_per_second": run.tokens_per_second,
                "ms_per_optimizer_step": run.ms_per_optimizer_step,
                "optimizer_state_bytes": run.optimizer_state_bytes,
                "sophia_clipped_fraction": run.sophia_clipped_fraction,
                "status": run.status,
            }
        )
    return rows


AGGREGATED = (
    "final_train_loss",
    "final_validation_loss",
    "steps_to_adamw_validation_loss",
    "fraction_of_adamw_steps",
    "tokens_per_second",
    "ms_per_optimizer_step",
    "sophia_clipped_fraction",
)


def aggregate_rows(runs: Sequence[RunResult]) -> list[dict]:
    """One dict per optimizer (in the order they first ran): the mean and sample sd over its finished
    seeds of each number of `summary_rows`, how many seeds reached AdamW's loss, and its runs' statuses."""
    rows = []
    by_optimizer: dict[str, list[tuple[RunResult, dict]]] = {}
    for run, row in zip(runs, summary_rows(runs)):
        by_optimizer.setdefault(run.optimizer, []).append((run, row))
    for pairs in by_optimizer.values():
        first = pairs[0][0]
        finished = [row for run, row in pairs if run.status == "finished"]
        out = {
            "optimizer": first.name,
            "knobs": knob_text(first),
            "steps": first.steps_planned,
            "seeds": [run.seed for run, _ in pairs],
            "finished_seeds": len(finished),
            "seeds_reaching_adamw": sum(row["steps_to_adamw_validation_loss"] is not None for row in finished),
            "optimizer_state_bytes": pairs[0][1]["optimizer_state_bytes"],
            "statuses": [run.status for run, _ in pairs],
        }
        for key in AGGREGATED:
            mean, sd = mean_sd([row[key] for row in finished if row[key] is not None])
            out[f"{key}_mean"], out[f"{key}_sd"] = mean, sd
        rows.append(out)
    return rows


def format_bytes(n: int | None) -> str:
    if n is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _number(value: float | None, fmt: str) -> str:
    return DASH if value is None or not math.isfinite(value) else format(value, fmt)


def _mean_sd_text(row: dict, key: str, fmt: str) -> str:
    mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
    if mean is None:
        return DASH
    return _number(mean, fmt) if sd is None else f"{_number(mean, fmt)} ± {_number(sd, fmt)}"


def _status_text(runs: Sequence[RunResult]) -> str:
    parts = []
    for run in runs:
        text = run.status if run.status != "interrupted" else f"interrupted at {run.steps_done}/{run.steps_planned}"
        if text not in parts:
            parts.append(text)
    if len(runs) > 1 and parts == ["finished"]:
        return f"finished x{len(runs)}"
    return ", ".join(parts)


def table_cells(runs: Sequence[RunResult]) -> list[list[str]]:
    """One row per optimizer: mean ± sd over seeds (just the value with one seed). The efficiency column
    is the (interpolated) step at which the optimizer reached its seed's AdamW final validation loss,
    and that step as a fraction of the horizon, which it always states."""
    cells = []
    for row in aggregate_rows(runs):
        members = [run for run in runs if run.name == row["optimizer"]]
        if row["steps_to_adamw_validation_loss_mean"] is None:
            efficiency = DASH
        else:
            efficiency = (
                f"{_mean_sd_text(row, 'steps_to_adamw_validation_loss', '.0f')} "
                f"({_mean_sd_text(row, 'fraction_of_adamw_steps', '.2f')}x of {row['steps']})"
            )
        if row["finished_seeds"] > 1 and row["seeds_reaching_adamw"] < row["finished_seeds"]:
            efficiency += f" [{row['seeds_reaching_adamw']}/{row['finished_seeds']} seeds]"
        clipped = row["sophia_clipped_fraction_mean"]
        cells.append(
            [
                row["optimizer"],
                row["knobs"],
                _mean_sd_text(row, "final_train_loss", ".3f"),
                _mean_sd_text(row, "final_validation_loss", ".3f"),
                efficiency,
                _number(row["tokens_per_second_mean"], ",.0f"),
                _number(row["ms_per_optimizer_step_mean"], ".2f"),
                format_bytes(row["optimizer_state_bytes"]),
                DASH if clipped is None else f"{100 * clipped:.1f}%",
                _status_text(members),
            ]
        )
    return cells


def render_table(runs: Sequence[RunResult], title: str) -> str:
    """The results table as text: a rich table when rich is installed, plain aligned columns otherwise."""
    cells = table_cells(runs)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)
    table = Table(title=title)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i in (0, len(COLUMNS) - 1) else "right")
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=160, force_terminal=False).print(table)
    return buffer.getvalue().rstrip()


def render_markdown(runs: Sequence[RunResult], title: str) -> str:
    """The table as markdown (what the README shows), under its title."""
    lines = [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_cells(runs)]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    # Written beside the target, then renamed: Ctrl-C during a write never leaves a truncated file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(out: Path, runs: Sequence[RunResult], config: dict) -> Path:
    payload = {
        "config": config,
        "aggregate": aggregate_rows(runs),
        "summary": summary_rows(runs),
        "runs": [run.to_dict() for run in runs],
    }
    path = out / RESULTS_JSON
    _atomic_write(path, json.dumps(payload, indent=2, allow_nan=True))
    return path


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(out: Path, runs: Sequence[RunResult]) -> tuple[Path, Path, Path]:
    """summary.csv (one row per run), aggregate.csv (one per optimizer: mean and sd over seeds) and
    curves.csv (every train and validation loss, by optimizer and seed)."""
    paths = []
    for name, rows in ((SUMMARY_CSV, summary_rows(runs)), (AGGREGATE_CSV, aggregate_rows(runs))):
        header = list(rows[0]) if rows else ["optimizer"]
        path = out / name
        _atomic_write(path, _csv_text(header, [[_csv_value(row[k]) for k in header] for row in rows]))
        paths.append(path)
    curve_rows = []
    for run in runs:
        curve_rows += [(run.name, run.seed, "train", s, v) for s, v in zip(run.train_steps, run.train_losses)]
        curve_rows += [
            (run.name, run.seed, "validation", s, v) for s, v in zip(run.eval_steps, run.validation_losses)
        ]
    curves_path = out / CURVES_CSV
    _atomic_write(curves_path, _csv_text(["optimizer", "seed", "split", "step", "loss"], curve_rows))
    return paths[0], paths[1], curves_path


def _csv_value(value: object) -> object:
    return " ".join(map(str, value)) if isinstance(value, list) else value


def _smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, so the first points are not pulled towards zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**i))
    return out


def _mean_curve(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[list, list, list]:
    """Pointwise mean and sample sd of curves over the steps they all reached (the longest curve alone
    when they share fewer than two steps)."""
    steps = list(curves[0][0]) if curves else []
    for curve_steps, _ in curves[1:]:
        length = 0
        while length < min(len(steps), len(curve_steps)) and steps[length] == curve_steps[length]:
            length += 1
        steps = steps[:length]
    if len(steps) < 2 and curves:  # curves with different steps: show the longest alone
        steps, values = max(curves, key=lambda curve: len(curve[0]))
        return list(steps), list(values), [0.0] * len(steps)
    means, sds = [], []
    for i in range(len(steps)):
        mean, sd = mean_sd([values[i] for _, values in curves])
        means.append(math.nan if mean is None else mean)
        sds.append(sd or 0.0)
    return steps, means, sds


def write_plot(out: Path, runs: Sequence[RunResult], title: str) -> Path | None:
    """The loss curves as a PNG; None (with a warning) where matplotlib is not installed, so that a
    finished comparison is never lost to a missing plotting library."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: %s not written (pip install 'fastoptim[compare]')", PLOT_PNG)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(run.name for run in runs))
    for name in names:
        members = [run for run in runs if run.name == name]
        finished = [run for run in members if run.status == "finished"]
        members = finished or members  # an interrupted seed does not cut the finished ones short
        label = name if len(members) == 1 else f"{name} (mean ± sd, {len(members)} seeds)"
        steps, train_mean, _ = _mean_curve([(r.train_steps, _smoothed(r.train_losses)) for r in members])
        (line,) = train_axis.plot(steps, train_mean, label=label, linewidth=1.2)
        steps, val_mean, val_sd = _mean_curve([(r.eval_steps, r.validation_losses) for r in members])
        val_axis.plot(steps, val_mean, marker="o", markersize=2, label=label, color=line.get_color())
        if len(members) > 1:
            low = [m - d for m, d in zip(val_mean, val_sd)]
            high = [m + d for m, d in zip(val_mean, val_sd)]
            val_axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    target = adamw_target(runs)
    if target is not None:
        label = "AdamW final" if len(adamw_targets(runs)) == 1 else "AdamW final (mean over seeds)"
        val_axis.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=label)
    train_axis.set_title("training loss (EMA 0.9)")
    val_axis.set_title("validation loss")
    for axis in (train_axis, val_axis):
        axis.set_xlabel("step")
        axis.set_ylabel("cross-entropy (nats/byte)")
        axis.grid(alpha=0.3)
        axis.legend()
    # The first steps (loss ~ ln 256) would squash the interesting part of the curves.
    finals = [
        v for run in runs for v in run.validation_losses[1:] + run.train_losses[len(run.train_losses) // 10 :]
    ]
    finals = [v for v in finals if math.isfinite(v)]
    if finals:
        low, high = min(finals), max(finals)
        for axis in (train_axis, val_axis):
            axis.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    figure.suptitle(title)
    figure.tight_layout()
    path = out / PLOT_PNG
    temporary = path.with_name("tmp-" + path.name)
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def write_all(out: Path, runs: Sequence[RunResult], config: dict, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plot = write_plot(out, runs, title)
    _atomic_write(out / SUMMARY_MD, render_markdown(runs, title))
    paths = [write_json(out, runs, config), *write_csv(out, runs), out / SUMMARY_MD]
    return paths + ([plot] if plot is not None else [])
