"""`python -m fastoptim compare`: the bundled corpus, the batches, the model, the CLI and its outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from fastoptim import cli
from fastoptim.compare import data
from fastoptim.compare.model import GPT, GPTConfig, language_model_loss
from fastoptim.compare.train import OPTIMIZERS, RunResult, lr_factor, optimizer_state_bytes, steps_to_reach


def test_corpus_is_bundled_english_text():
    text = data.load_corpus_bytes().decode("utf-8")
    assert 3_000_000 < len(text) < 5_000_000
    assert "It is a truth universally acknowledged" in text  # Pride and Prejudice
    assert "Project Gutenberg" not in text  # the licence boilerplate is not part of the corpus


def test_split_is_contiguous_and_disjoint():
    tokens = data.corpus_tokens()
    split = data.train_validation_split(tokens, 0.1)
    assert len(split.train) + len(split.validation) == len(tokens)
    assert torch.equal(torch.cat([split.train, split.validation]), tokens)
    with pytest.raises(ValueError, match="validation_fraction"):
        data.train_validation_split(tokens, 1.0)


def test_batches_are_deterministic_and_seeded():
    tokens = data.train_validation_split(data.corpus_tokens()).train
    first = data.BatchSchedule(tokens, steps=5, batch_size=3, block_size=17, seed=7)
    again = data.BatchSchedule(tokens, steps=5, batch_size=3, block_size=17, seed=7)
    other = data.BatchSchedule(tokens, steps=5, batch_size=3, block_size=17, seed=8)
    torch.manual_seed(123)  # the global RNG must not matter
    for step in range(5):
        inputs, targets = first.batch(step)
        assert inputs.shape == targets.shape == (3, 17) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        assert torch.equal(inputs, again.batch(step)[0]) and torch.equal(targets, again.batch(step)[1])
    assert not torch.equal(first.offsets, other.offsets)


@pytest.mark.parametrize("tie_head", [False, True])
def test_model_forward_shape_and_initial_loss(tie_head):
    config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, tie_head=tie_head)
    model = GPT(config)
    idx = torch.randint(0, 256, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 256)
    # At initialization the prediction is close to uniform over the 256 bytes.
    assert abs(language_model_loss(logits, torch.randint(0, 256, (3, 11))).item() - math.log(256)) < 0.1
    assert (model.lm_head.weight is model.token_embedding.weight) == tie_head
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_is_causal():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 256, (1, 10))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 256
    assert torch.allclose(model(idx)[:, :7], model(changed)[:, :7])
    assert not torch.allclose(model(idx)[:, 7:], model(changed)[:, 7:])


def test_lr_schedule_warms_up_and_decays_to_a_tenth():
    factors = [lr_factor(step, 100) for step in range(100)]
    assert factors[0] < factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_optimizer_state_bytes_counts_each_storage_once():
    param = torch.nn.Parameter(torch.zeros(10, 4))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    assert optimizer_state_bytes(optimizer) == 0
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 10 * 4 * 4
    buffer = torch.zeros(8)
    optimizer.state[param]["views"] = [buffer[:4], buffer[4:]]  # one storage, two views
    assert optimizer_state_bytes(optimizer) == 10 * 4 * 4 + 8 * 4


def test_steps_to_reach():
    run = RunResult("muon", "", 0.02, 1e-3, 100, eval_steps=[0, 50, 100], validation_losses=[5.5, 2.0, 1.5])
    assert steps_to_reach(run, 2.0) == 50
    assert steps_to_reach(run, 1.5) == 100
    assert steps_to_reach(run, 1.0) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "adamw,lion"], "unknown optimizer 'lion'"),
        (["--optimizers", ""], "at least one optimizer"),
        (["--optimizers", "muon,muon"], "listed twice"),
        (["--steps", "0"], "positive integer"),
        (["--lr-muon", "-1"], "positive finite"),
        (["--lr-adamw", "nan"], "positive finite"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["compare", "--quick", "--out", str(tmp_path), *argv])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_compare_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "compare"
    assert cli.main(["compare", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "NorMuon" in printed

    results = json.loads((out / "results.json").read_text())
    assert [row["optimizer"] for row in results["summary"]] == ["AdamW", "Muon", "NorMuon", "SophiaG"]
    for row, run in zip(results["summary"], results["runs"]):
        assert row["status"] == "finished", row
        assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["final_validation_loss"])
        assert row["final_validation_loss"] < math.log(256)  # every optimizer learned something
        assert row["tokens_per_second"] > 0 and row["ms_per_optimizer_step"] > 0
        assert row["optimizer_state_bytes"] > 0
        assert run["steps_done"] == results["config"]["steps"] == len(run["train_losses"])
        # same data order, init and budget: the first loss (before any update) is identical
        assert run["validation_losses"][0] == results["runs"][0]["validation_losses"][0]
    assert results["summary"][0]["steps_to_adamw_validation_loss"] is not None  # AdamW reaches its own
    muon_diagnostics = results["runs"][1]["diagnostics"]
    assert [d["step"] for d in muon_diagnostics] == results["runs"][1]["eval_steps"]
    assert math.isfinite(muon_diagnostics[-1]["weight_stable_rank_mean"])
    assert 0.0 <= results["runs"][3]["diagnostics"][-1]["sophia_win_rate"] <= 1.0

    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["optimizer"] for row in rows] == ["AdamW", "Muon", "NorMuon", "SophiaG"]
    assert (out / "curves.csv").stat().st_size > 0
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule", ["uba", "wsd"])
def test_schedule_options_reach_the_json(tmp_path, schedule):
    out = tmp_path / schedule
    argv = ["compare", "--quick", "--steps", "8", "--optimizers", "muon", "--schedule", schedule, "--phi", "1.5"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lr_schedule"] == schedule and results["config"]["phi"] == 1.5
    assert results["runs"][0]["status"] == "finished"


def test_schedule_shapes_differ():
    from fastoptim.compare.train import lr_factor

    cosine = [lr_factor(step, 100) for step in range(100)]
    assert cosine == [lr_factor(step, 100, "uba", 2.0) for step in range(100)]  # phi = 2 is cosine
    assert lr_factor(50, 100, "uba", 0.5) > lr_factor(50, 100) > lr_factor(50, 100, "uba", 8.0)
    assert lr_factor(50, 100, "wsd") == 1.0  # stable phase


def test_interrupt_leaves_finished_results_written(tmp_path, monkeypatch):
    from fastoptim.compare import cli as command

    real_train = command.train

    def train_then_interrupt(experiment, run, on_step=None):
        if run.optimizer == "muon":
            raise KeyboardInterrupt
        return real_train(experiment, run, on_step)

    monkeypatch.setattr(command, "train", train_then_interrupt)
    out = tmp_path / "interrupted"
    code = cli.main(["compare", "--quick", "--steps", "6", "--optimizers", "adamw,muon", "--out", str(out)])
    assert code == 130
    results = json.loads((out / "results.json").read_text())
    assert [run["status"] for run in results["runs"]] == ["finished", "interrupted"]
    assert math.isfinite(results["summary"][0]["final_validation_loss"])
    assert (out / "loss_curves.png").exists() and (out / "summary.csv").exists()


def test_interrupt_during_a_result_write_is_held_until_the_files_are_complete(tmp_path, monkeypatch):
    """Ctrl-C arriving while results are written (here: raised by the OS as SIGINT in the middle of the
    write) waits until the write is done; every finished run's files are complete."""
    import os
    import signal

    from fastoptim.compare import cli as command
    from fastoptim.compare import report

    real_write = report.write_all
    calls = []

    def write_with_sigint(out, runs, config, title):
        calls.append(len(runs))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # delivered only after this write
        return real_write(out, runs, config, title)

    monkeypatch.setattr(command.report, "write_all", write_with_sigint)
    out = tmp_path / "held"
    code = cli.main(["compare", "--quick", "--steps", "4", "--optimizers", "adamw,muon", "--out", str(out)])
    assert code == 130
    results = json.loads((out / "results.json").read_text())
    assert [run["status"] for run in results["runs"]] == ["finished"]
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_out_that_cannot_hold_results_is_a_usage_error(kind, tmp_path, capsys):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("not a folder")
        out, message = target, "not a folder"
    else:
        out, message = target / "sub", "cannot"
        target.write_text("a file where a parent folder should be")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["compare", "--quick", "--out", str(out)])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_every_optimizer_has_a_default_rate():
    from fastoptim.compare.train import PRESETS

    for preset in PRESETS.values():
        assert set(preset.learning_rates) == set(OPTIMIZERS)


def test_missing_matplotlib_skips_only_the_plot(tmp_path, monkeypatch, caplog):
    import sys

    from fastoptim.compare import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.write_plot(tmp_path, [], "title") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / report.PLOT_PNG).exists()
