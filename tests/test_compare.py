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
from fastoptim.compare.train import (
    OPTIMIZERS,
    Hyperparameters,
    RunResult,
    lr_factor,
    optimizer_state_bytes,
    steps_to_reach,
)


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


def test_steps_to_reach_interpolates_between_evaluations():
    run = RunResult(
        "muon", "", Hyperparameters(lr=0.02), 100, eval_steps=[0, 50, 100], validation_losses=[5.5, 2.0, 1.5]
    )
    assert steps_to_reach(run, 2.0) == 50
    assert steps_to_reach(run, 1.5) == 100
    assert steps_to_reach(run, 1.0) is None
    # 1.75 lies halfway between the evaluations at 50 (2.0) and 100 (1.5)
    assert steps_to_reach(run, 1.75) == pytest.approx(75.0)
    assert steps_to_reach(run, 3.75) == pytest.approx(25.0)  # from step 0 (5.5) to 50 (2.0)
    bumpy = RunResult("adamw", "", Hyperparameters(lr=1e-3), 30, eval_steps=[0, 10, 20, 30],
                      validation_losses=[5.0, 3.0, 3.2, 2.0])
    assert steps_to_reach(bumpy, 2.6) == pytest.approx(20 + 0.6 / 1.2 * 10)  # the first crossing counts


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


@pytest.mark.timeout(300)  # seconds of CPU; the margin is for a shared machine
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
    # evaluation every 10 steps (quick preset: 60 steps)
    assert results["config"]["eval_every"] == 10
    assert all(run["eval_steps"] == list(range(0, 61, 10)) for run in results["runs"])
    # SophiaG's clipped fraction: at every evaluation after the first, and over the run, in the table
    sophia = results["runs"][3]
    clipped = [d["sophia_clipped_fraction"] for d in sophia["diagnostics"][1:]]
    assert len(clipped) == 6 and all(0.0 <= c <= 1.0 for c in clipped)
    assert sophia["sophia_clipped_fraction"] == pytest.approx(sum(clipped) / 6)  # 10 steps per evaluation
    assert results["summary"][3]["sophia_clipped_fraction"] == sophia["sophia_clipped_fraction"]
    assert "sophia_clipped_fraction" not in results["runs"][0]["diagnostics"][-1]
    assert f"{100 * sophia['sophia_clipped_fraction']:.1f}%" in printed
    assert results["summary"][0]["sophia_clipped_fraction"] is None

    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["optimizer"] for row in rows] == ["AdamW", "Muon", "NorMuon", "SophiaG"]
    with open(out / "aggregate.csv", newline="") as handle:
        assert [row["optimizer"] for row in csv.DictReader(handle)] == ["AdamW", "Muon", "NorMuon", "SophiaG"]
    assert (out / "curves.csv").stat().st_size > 0
    markdown = (out / "summary.md").read_text()
    assert markdown.count("\n| ") == 5 and "| SophiaG |" in markdown  # header + 4 optimizers
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


def test_every_preset_sets_every_optimizer():
    from fastoptim.compare.train import PRESETS

    for preset in PRESETS.values():
        assert set(preset.hyperparameters) == set(OPTIMIZERS)
        assert preset.eval_every <= 50
    assert PRESETS["cpu"].eval_every == 10 and PRESETS["quick"].eval_every == 10


def test_missing_matplotlib_skips_only_the_plot(tmp_path, monkeypatch, caplog):
    import sys

    from fastoptim.compare import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.write_plot(tmp_path, [], "title") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / report.PLOT_PNG).exists()


# --------------------------------------------------------------------------------------------------
# Fair comparison: seeds, SophiaG's clipped fraction and recipe, the sweep, the presets it produced


def _finished_run(optimizer, seed, val, train, eval_losses, steps=30, clipped=None):
    run = RunResult(optimizer, "", Hyperparameters(lr=1e-3), steps, seed=seed, status="finished")
    run.eval_steps = list(range(0, steps + 1, 10))
    run.validation_losses = eval_losses
    run.final_validation_loss, run.final_train_loss = val, train
    run.tokens_per_second, run.ms_per_optimizer_step, run.optimizer_state_bytes = 1000.0, 1.0, 64
    run.sophia_clipped_fraction = clipped
    return run


def test_seed_aggregation_is_mean_and_sample_sd():
    import statistics

    from fastoptim.compare import report

    runs = [
        _finished_run("adamw", 0, 2.0, 2.1, [5.0, 3.0, 2.5, 2.0]),
        _finished_run("muon", 0, 1.5, 1.6, [5.0, 2.5, 2.0, 1.5]),  # reaches 2.0 at step 20
        _finished_run("adamw", 1, 2.2, 2.3, [5.0, 3.2, 2.6, 2.2]),
        _finished_run("muon", 1, 1.7, 1.8, [5.0, 2.6, 2.1, 1.7]),  # reaches 2.2 at 10 + 0.4/0.5 * 10 = 18
        _finished_run("adamw", 2, 2.1, 2.2, [5.0, 3.1, 2.4, 2.1]),
        _finished_run("muon", 2, 1.4, 1.5, [5.0, 2.4, 1.9, 1.4]),  # reaches 2.1 at 10 + 0.3/0.5 * 10 = 16
    ]
    rows = {row["optimizer"]: row for row in report.aggregate_rows(runs)}
    assert rows["AdamW"]["seeds"] == [0, 1, 2] and rows["Muon"]["finished_seeds"] == 3
    for name, vals in (("AdamW", [2.0, 2.2, 2.1]), ("Muon", [1.5, 1.7, 1.4])):
        assert rows[name]["final_validation_loss_mean"] == pytest.approx(statistics.fmean(vals))
        assert rows[name]["final_validation_loss_sd"] == pytest.approx(statistics.stdev(vals))  # n - 1
    steps = [20.0, 18.0, 16.0]
    assert rows["Muon"]["steps_to_adamw_validation_loss_mean"] == pytest.approx(statistics.fmean(steps))
    assert rows["Muon"]["steps_to_adamw_validation_loss_sd"] == pytest.approx(statistics.stdev(steps))
    assert rows["Muon"]["fraction_of_adamw_steps_mean"] == pytest.approx(statistics.fmean(steps) / 30)
    assert rows["Muon"]["seeds_reaching_adamw"] == 3
    # each seed is measured against its own AdamW
    targets = [row["adamw_validation_loss_target"] for row in report.summary_rows(runs)]
    assert targets == [2.0, 2.0, 2.2, 2.2, 2.1, 2.1]
    muon_cells = dict(zip(report.COLUMNS, report.table_cells(runs)[1]))
    assert muon_cells["val loss"] == "1.533 ± 0.153"
    assert muon_cells["steps to AdamW's val loss"] == "18 ± 2 (0.60 ± 0.07x of 30)"  # the horizon stated
    assert muon_cells["status"] == "finished x3"
    # one seed: the value alone; an unfinished run does not enter the mean
    runs[5].status = "interrupted"
    rows = {row["optimizer"]: row for row in report.aggregate_rows(runs)}
    assert rows["Muon"]["final_validation_loss_mean"] == pytest.approx(1.6)
    assert rows["Muon"]["finished_seeds"] == 2
    assert report.mean_sd([1.0]) == (1.0, None) and report.mean_sd([]) == (None, None)


def test_seeds_option_runs_every_seed_and_aggregates(tmp_path, capsys):
    import statistics

    out = tmp_path / "seeds"
    argv = ["compare", "--quick", "--steps", "6", "--optimizers", "adamw,muon", "--seeds", "2", "--seed", "3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == [3, 4]
    assert [(r["optimizer"], r["seed"]) for r in results["runs"]] == [
        ("adamw", 3), ("muon", 3), ("adamw", 4), ("muon", 4)
    ]
    # different seeds: different initial weights and data, so different losses
    assert results["runs"][0]["validation_losses"][0] != results["runs"][2]["validation_losses"][0]
    for row in results["aggregate"]:
        values = [s["final_validation_loss"] for s in results["summary"] if s["optimizer"] == row["optimizer"]]
        assert row["final_validation_loss_mean"] == pytest.approx(statistics.fmean(values))
        assert row["final_validation_loss_sd"] == pytest.approx(statistics.stdev(values))
    assert "±" in printed and "seeds 3-4 (mean ± sd)" in printed
    with open(out / "curves.csv", newline="") as handle:
        assert {row["seed"] for row in csv.DictReader(handle)} == {"3", "4"}


def test_set_overrides_one_knob_and_bad_settings_exit_2(tmp_path, capsys):
    out = tmp_path / "set"
    argv = ["compare", "--quick", "--steps", "3", "--optimizers", "adamw", "--set", "adamw.beta2=0.99",
            "--set", "adamw.grad_clip=0", "--lr-adamw", "3e-3", "--out", str(out)]
    assert cli.main(argv) == 0
    knobs = json.loads((out / "results.json").read_text())["config"]["hyperparameters"]["adamw"]
    assert knobs == {"lr": 3e-3, "beta2": 0.99, "warmup_fraction": 0.05, "grad_clip": 0.0}
    for bad, message in (
        ("muon.rho=1", "has no knob 'rho'"),
        ("adamw.beta2=1.5", "below 1"),
        ("adamw.lr=0", "positive"),
        ("adamw.lr", "OPTIMIZER.KNOB=VALUE"),
        ("adamw.lr=1e-3,2e-3", "one value"),
        ("lion.lr=1", "unknown optimizer"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            cli.main(["compare", "--quick", "--set", bad, "--out", str(out)])
        assert excinfo.value.code == 2
        assert message in capsys.readouterr().err


def test_sophia_clipped_fraction_is_the_ops_own_count():
    """What compare reports after a SophiaG step equals 1 - sophia_step_'s own return_unclipped count for
    that step, and the float64 fraction of coordinates with |m / max(rho·bs·h, eps)| >= 1."""
    import fastoptim
    from fastoptim.compare.train import sophia_clipped_fraction

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    params = list(model.parameters())
    rho, bs, beta1, lr, wd = 0.5, 64, 0.965, 1e-3, 0.2
    optimizer = fastoptim.SophiaG(params, lr=lr, betas=(beta1, 0.99), rho=rho, bs=bs, weight_decay=wd)
    with pytest.raises(ValueError, match="no SophiaG state"):
        sophia_clipped_fraction(optimizer)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in params:
        optimizer.state[p]["hessian"].copy_(torch.rand_like(p) * 1e-2)
        p.grad = torch.randn_like(p)
    before = [(p.detach().clone(), p.grad.clone(), optimizer.state[p]["exp_avg"].clone(),
               optimizer.state[p]["hessian"].clone()) for p in params]
    optimizer.step()
    reported = sophia_clipped_fraction(optimizer)

    m = torch.cat([torch.lerp(e.double(), g.double(), 1 - beta1).flatten() for _, g, e, _ in before])
    h = torch.cat([h.double().flatten() for *_, h in before])
    expected = ((m / torch.clamp(rho * bs * h, min=1e-15)).abs() >= 1).double().mean().item()
    copies, grads, exp_avgs, hessians = (list(x) for x in zip(*before))  # the op updates these copies
    unclipped = fastoptim.ops.sophia_step_(
        copies, grads, exp_avgs, hessians, lr=lr, beta1=beta1, rho=rho * bs, weight_decay=wd,
        return_unclipped=True, backend="torch",
    )
    assert reported.dim() == 0
    assert reported.item() == pytest.approx(1.0 - unclipped.item(), abs=1e-6)
    assert reported.item() == pytest.approx(expected, abs=1e-6)
    assert 0.05 < expected < 0.95  # a mix of clipped and unclipped coordinates, so the count is tested


def test_sweep_searches_coordinate_wise_and_keeps_the_best(tmp_path, monkeypatch):
    """With a known loss surface in place of training, each pass keeps its best value and the next pass
    starts from it; runs with the same knobs are trained once."""
    from fastoptim.compare import sweep

    trained = []

    def fake_train(experiment, run, on_step=None):
        h = run.hyperparameters
        trained.append((run.optimizer, h))
        if run.optimizer == "adamw":
            loss = 2.0 + (math.log2(h.lr) - math.log2(4e-3)) ** 2 + 10 * abs(h.beta2 - 0.99) + h.warmup_fraction
        else:  # sophia: the best lr depends on rho (it rescales the steps), as in the real optimizer
            loss = 3.0 + 0.1 * (math.log2(h.lr) - math.log2(1e-3 * h.rho / 0.04)) ** 2 + abs(math.log2(h.rho))
        run.final_validation_loss, run.final_train_loss, run.status = loss, loss, "finished"
        return run

    monkeypatch.setattr(sweep, "train", fake_train)
    out = tmp_path / "fake"
    argv = ["sweep", "--quick", "--steps", "2", "--optimizers", "adamw,sophia",
            "--grid", "adamw.lr=1e-3,2e-3,4e-3,8e-3", "--grid", "adamw.beta2=0.95,0.99,0.999",
            "--grid", "sophia.lr=5e-4,1e-3", "--grid", "sophia.rho=0.04,1", "--grid", "sophia.lr=1e-3,2e-2,2.5e-2",
            "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    best = {row["optimizer"]: row["knobs"] for row in result["best"]}
    assert best["AdamW"] == {"lr": 4e-3, "beta2": 0.99, "warmup_fraction": 0.05, "grad_clip": 1.0}
    # SophiaG: lr 1e-3 at rho 0.04, then rho 1, then lr again at rho 1 (best 2.5e-2 there)
    assert best["SophiaG"] == {"lr": 2.5e-2, "rho": 1.0, "grad_clip": 1.0}
    assert len(trained) == len(set(trained))  # nothing trained twice
    adamw_trials = [row for row in result["trials"] if row["optimizer"] == "AdamW"]
    # start (2e-3), lr 1e-3/4e-3/8e-3 (2e-3 known), beta2 0.99/0.999 at lr 4e-3 (0.95 known)
    assert [(row["pass"], row["lr"], row["beta2"]) for row in adamw_trials] == [
        ("start", 2e-3, 0.95), ("lr", 1e-3, 0.95), ("lr", 4e-3, 0.95), ("lr", 8e-3, 0.95),
        ("beta2", 4e-3, 0.99), ("beta2", 4e-3, 0.999),
    ]
    markdown = (out / "sweep.md").read_text()
    bold_rows = [line for line in markdown.splitlines() if line.startswith("|") and "**" in line]
    assert len(bold_rows) == 2 and "**2.0500**" in bold_rows[0] and "**3.0000**" in bold_rows[1]
    assert "--grid adamw.lr=0.001,0.002,0.004,0.008" in result["config"]["command"]
    with open(out / "sweep.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(result["trials"]) == len(trained)


@pytest.mark.timeout(120)
def test_sweep_command_on_a_tiny_grid(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--quick", "--steps", "6", "--optimizers", "adamw,sophia",
            "--grid", "adamw.lr=2e-3,4e-3", "--grid", "sophia.rho=0.04,1", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "best knobs" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert [(row["optimizer"], row["pass"]) for row in result["trials"]] == [
        ("AdamW", "start"), ("AdamW", "lr"), ("SophiaG", "start"), ("SophiaG", "rho")
    ]
    assert all(row["status"] == "finished" and math.isfinite(row["final_validation_loss"]) for row in result["trials"])
    for name in ("AdamW", "SophiaG"):
        trials = [row for row in result["trials"] if row["optimizer"] == name]
        best = next(row for row in result["best"] if row["optimizer"] == name)
        assert best["final_validation_loss"] == min(row["final_validation_loss"] for row in trials)
    sophia = [row for row in result["trials"] if row["optimizer"] == "SophiaG"]
    assert all(0.0 <= row["sophia_clipped_fraction"] <= 1.0 for row in sophia)
    assert result["config"]["steps"] == 6 and result["config"]["versions"]["torch"] == torch.__version__
    assert (out / "sweep.md").read_text().startswith("# fastoptim sweep: preset quick, 6 steps, seed 0")
    assert (out / "sweep.csv").exists()


def test_bad_sweep_arguments_exit_2(tmp_path, capsys):
    for bad, message in (("--grid", "sophia.beta2=0.9"), ("--grid", "adamw.lr=1e-3,x")):
        with pytest.raises(SystemExit) as excinfo:
            cli.main(["sweep", "--quick", bad, message, "--out", str(tmp_path)])
        assert excinfo.value.code == 2
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["sweep", "--quick", "--out", str(target)])
    assert excinfo.value.code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("preset_name", ["quick", "cpu"])
def test_presets_come_from_the_sweep_grid(preset_name):
    """Every tuned knob of a preset is a value its sweep grid searches (the comment above PRESETS gives
    the command); knobs the grid does not vary keep the sweep's starting value."""
    from fastoptim.compare.sweep import GRID_START, GRIDS
    from fastoptim.compare.train import KNOBS, PRESETS

    preset = PRESETS[preset_name]
    for optimizer in OPTIMIZERS:
        searched: dict[str, set] = {}
        for knob, values in GRIDS[preset_name][optimizer]:
            searched.setdefault(knob, set()).update(values)
        chosen = preset.hyperparameters[optimizer]
        for knob in KNOBS[optimizer]:
            value = getattr(chosen, knob)
            if knob in searched:
                assert value in searched[knob], (preset_name, optimizer, knob, value)
            else:
                assert value == getattr(GRID_START[optimizer], knob), (preset_name, optimizer, knob)


def _tiny_experiment(steps=20):
    from fastoptim.compare.train import Experiment, Preset

    preset = Preset(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), steps, 4, 10, 1, {})
    return Experiment(preset, steps, 0, torch.device("cpu"), data.train_validation_split(data.corpus_tokens()))


def test_sophia_hessian_uses_fresh_batches(monkeypatch):
    """SophiaG's Hessian estimate (every 10 steps) runs on batches of its own stream, never a training batch."""
    from fastoptim.compare.train import train

    experiment = _tiny_experiment(steps=30)
    used = []
    real_batch = experiment.hessian_schedule.batch

    def spy(index, device="cpu"):
        used.append(index)
        return real_batch(index, device)

    monkeypatch.setattr(experiment.hessian_schedule, "batch", spy)
    run = train(experiment, RunResult("sophia", "", Hyperparameters(lr=1e-3), 30))
    assert run.status == "finished"
    assert used == [1, 2]  # after steps 10 and 20 (not after the last step: it would be unused)
    training = {tuple(o.tolist()) for o in experiment.schedule.offsets}
    assert not any(tuple(experiment.hessian_schedule.offsets[i].tolist()) in training for i in used)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_gradient_clipping_reaches_the_optimizer(grad_clip, monkeypatch):
    """The gradient norm the optimizer sees is clipped to grad_clip (0 = not clipped)."""
    from fastoptim.compare import train as train_module

    norms = []
    real_build = train_module.build_optimizer

    def build(name, model, hyperparameters, tokens_per_step, device):
        scheduled = real_build(name, model, hyperparameters, tokens_per_step, device)
        real_step = scheduled.optimizer.step

        def step(*args, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return real_step(*args, **kwargs)

        scheduled.optimizer.step = step
        return scheduled

    monkeypatch.setattr(train_module, "build_optimizer", build)
    train_module.train(_tiny_experiment(5), RunResult("adamw", "", Hyperparameters(lr=1e-3, grad_clip=grad_clip), 5))
    assert len(norms) == 5
    if grad_clip:
        assert max(norms) <= grad_clip * (1 + 1e-5)
    else:
        assert max(norms) > 0.05  # the unclipped gradients are larger than the clip tested above
