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

from .train import RunResult, steps_to_reach

RESULTS_JSON = "results.json"
SUMMARY_CSV = "summary.csv"
CURVES_CSV = "curves.csv"
PLOT_PNG = "loss_curves.png"
logger = logging.getLogger(__name__)
DASH = "—"

COLUMNS = (
    "optimizer",
    "peak lr",
    "train loss",
    "val loss",
    "steps to AdamW val",
    "tokens/s",
    "ms/opt step",
    "opt state",
    "status",
)


def adamw_target(runs: Sequence[RunResult]) -> float | None:
    """AdamW's final validation loss, the target of the "training efficiency" column (if AdamW finished)."""
    for run in runs:
        if run.optimizer == "adamw" and run.status == "finished":
            return run.final_validation_loss
    return None


def summary_rows(runs: Sequence[RunResult]) -> list[dict]:
    """One dict of plain numbers per run (None where there is nothing to report)."""
    target = adamw_target(runs)
    rows = []
    for run in runs:
        reached = steps_to_reach(run, target) if target is not None else None
        rows.append(
            {
                "optimizer": run.name,
                "implementation": run.implementation,
                "learning_rate": run.learning_rate,
                "adamw_learning_rate": run.adamw_learning_rate,
                "steps_done": run.steps_done,
                "final_train_loss": run.final_train_loss,
                "final_validation_loss": run.final_validation_loss,
                "steps_to_adamw_validation_loss": reached,
                "adamw_validation_loss_target": target,
                "tokens_per_second": run.tokens_per_second,
                "ms_per_optimizer_step": run.ms_per_optimizer_step,
                "optimizer_state_bytes": run.optimizer_state_bytes,
                "status": run.status,
            }
        )
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


def table_cells(runs: Sequence[RunResult]) -> list[list[str]]:
    cells = []
    for row, run in zip(summary_rows(runs), runs):
        reached = row["steps_to_adamw_validation_loss"]
        efficiency = DASH if reached is None else f"{reached} ({reached / run.steps_planned:.2f}x budget)"
        status = (
            run.status
            if run.status != "interrupted"
            else f"interrupted at {run.steps_done}/{run.steps_planned}"
        )
        cells.append(
            [
                run.name,
                f"{run.learning_rate:g}",
                _number(row["final_train_loss"], ".4f"),
                _number(row["final_validation_loss"], ".4f"),
                efficiency,
                _number(row["tokens_per_second"], ",.0f"),
                _number(row["ms_per_optimizer_step"], ".2f"),
                format_bytes(row["optimizer_state_bytes"]),
                status,
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


def _atomic_write(path: Path, text: str) -> None:
    # Written beside the target, then renamed: Ctrl-C during a write never leaves a truncated file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(out: Path, runs: Sequence[RunResult], config: dict) -> Path:
    payload = {"config": config, "summary": summary_rows(runs), "runs": [run.to_dict() for run in runs]}
    path = out / RESULTS_JSON
    _atomic_write(path, json.dumps(payload, indent=2, allow_nan=True))
    return path


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(out: Path, runs: Sequence[RunResult]) -> tuple[Path, Path]:
    summary = summary_rows(runs)
    header = list(summary[0]) if summary else ["optimizer"]
    summary_path = out / SUMMARY_CSV
    _atomic_write(summary_path, _csv_text(header, [[row[k] for k in header] for row in summary]))
    curve_rows = []
    for run in runs:
        curve_rows += [(run.name, "train", s, v) for s, v in zip(run.train_steps, run.train_losses)]
        curve_rows += [(run.name, "validation", s, v) for s, v in zip(run.eval_steps, run.validation_losses)]
    curves_path = out / CURVES_CSV
    _atomic_write(curves_path, _csv_text(["optimizer", "split", "step", "loss"], curve_rows))
    return summary_path, curves_path


def _smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, so the first points are not pulled towards zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**i))
    return out


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
    for run in runs:
        train_axis.plot(run.train_steps, _smoothed(run.train_losses), label=run.name, linewidth=1.2)
        val_axis.plot(run.eval_steps, run.validation_losses, marker="o", markersize=3, label=run.name)
    target = adamw_target(runs)
    if target is not None:
        val_axis.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="AdamW final")
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
    return [write_json(out, runs, config), *write_csv(out, runs), *([plot] if plot is not None else [])]
