"""The training loop of `python -m fastoptim compare` and the numbers it measures.

Every optimizer trains the same model from the same initial weights on the same batches in the same
order, for the same number of steps, under the same learning-rate shape (linear warm-up, then cosine
decay to 10%); what differs is the optimizer and its own tuned knobs (`Hyperparameters`), each chosen
by `python -m fastoptim sweep` (see `sweep.py` and the comment above `PRESETS`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import torch

import fastoptim
from fastoptim import diagnostics, schedules

from .data import BatchSchedule, Split, evaluation_batches
from .model import GPT, GPTConfig, language_model_loss

OPTIMIZERS = ("adamw", "muon", "normuon", "sophia")
DISPLAY_NAMES = {"adamw": "AdamW", "muon": "Muon", "normuon": "NorMuon", "sophia": "SophiaG"}


@dataclass(frozen=True)
class Hyperparameters:
    """One optimizer's knobs. Each optimizer reads only its own (`KNOBS`); the rest keep their defaults.

    grad_clip: the global gradient norm is clipped to it before every step (0 = no clipping).
    """

    lr: float  # peak learning rate (Muon/NorMuon: of the hidden matrices)
    adamw_lr: float = 2e-3  # Muon/NorMuon: peak rate of their AdamW part (embeddings, head, norms)
    beta2: float = 0.95  # AdamW's second-moment decay
    warmup_fraction: float = 0.05  # linear warm-up over this fraction of the steps
    rho: float = 0.04  # SophiaG's clipping scale (the op sees rho x tokens per step, as the official code)
    grad_clip: float = 1.0

    def knobs(self, optimizer: str) -> dict[str, float]:
        """The knobs `optimizer` reads, by name."""
        return {name: getattr(self, name) for name in KNOBS[optimizer]}

    def with_values(self, **values: float) -> Hyperparameters:
        return replace(self, **values)


HYPERPARAMETER_NAMES = tuple(f.name for f in fields(Hyperparameters))
# What each optimizer reads (and the sweep tunes). AdamW: lr, beta2, warm-up; Muon/NorMuon: lr and the
# AdamW part's lr; SophiaG: lr and rho. grad_clip is read by all (see PRESETS for the decision).
KNOBS = {
    "adamw": ("lr", "beta2", "warmup_fraction", "grad_clip"),
    "muon": ("lr", "adamw_lr", "grad_clip"),
    "normuon": ("lr", "adamw_lr", "grad_clip"),
    "sophia": ("lr", "rho", "grad_clip"),
}


@dataclass(frozen=True)
class Preset:
    """A model and a token budget sized for a device, and each optimizer's knobs."""

    model: GPTConfig
    steps: int
    batch_size: int
    eval_every: int
    eval_batches: int
    hyperparameters: dict[str, Hyperparameters]


# Where the knobs come from: `python -m fastoptim sweep` (sweep.py: coordinate-wise over GRIDS from
# GRID_START, one knob at a time, lowest final validation loss at seed 0; its sweep.md lists every run):
# - quick: `python -m fastoptim sweep --quick` (2026-12-02, torch 2.14.1, CPU, one thread).
# - cpu: `python -m fastoptim sweep --optimizers adamw,muon` and `... --optimizers sophia,normuon` (same day;
#   the same search as one `python -m fastoptim sweep`, split in two processes); Muon/NorMuon rerun alone
#   (`--optimizers muon`, `--optimizers normuon`: the first pair ran in the shared working tree while another
#   change was half made there, and its Muon runs failed). Muon: lr 0.04, adamw_lr 8e-3 (val 1.638);
#   NorMuon: lr 0.04, adamw_lr 4e-3 (val 1.597).
#   AdamW: lr 4e-3, beta2 0.99, warm-up 20% (val 1.978; the old knobs, lr 2e-3 alone, 2.152 with clipping).
#   SophiaG: lr 5e-4, rho 0.04 (val 2.297; ~93% of the coordinates clipped over the run; 2.972 unclipped
#   gradients).
# - cuda: not tuned (no GPU was at hand): guesses from the cpu choices.
# Gradient clipping at 1.0 is applied to every optimizer: in both sweeps it helped or was neutral for each (cpu,
# with / without: AdamW 1.978 / 1.980, Muon 1.638 / 1.659, NorMuon 1.597 / 1.648, SophiaG 2.297 / 2.972;
# quick: better for all four), and it is part of SophiaG's official recipe.
# Fixed for every optimizer: betas[0] 0.9 (SophiaG 0.965 and 0.99, the official values), weight decay 0.1 on
# matrices for AdamW and 0.2 for SophiaG (the official recipe), none for Muon/NorMuon.
PRESETS = {
    "quick": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64),
        steps=60,
        batch_size=16,
        eval_every=10,
        eval_batches=4,
        hyperparameters={
            "adamw": Hyperparameters(lr=4e-3, beta2=0.95, warmup_fraction=0.05),
            "muon": Hyperparameters(lr=0.02, adamw_lr=8e-3),
            "normuon": Hyperparameters(lr=0.04, adamw_lr=8e-3),
            "sophia": Hyperparameters(lr=4e-3, rho=0.2),
        },
    ),
    "cpu": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128),
        steps=300,
        batch_size=32,
        eval_every=10,
        eval_batches=6,
        hyperparameters={
            "adamw": Hyperparameters(lr=4e-3, beta2=0.99, warmup_fraction=0.2),
            "muon": Hyperparameters(lr=0.04, adamw_lr=8e-3),
            "normuon": Hyperparameters(lr=0.04, adamw_lr=4e-3),
            "sophia": Hyperparameters(lr=5e-4, rho=0.04),
        },
    ),
    # Untuned (no GPU was at hand for a sweep): the cpu preset's choices scaled by guesswork.
    "cuda": Preset(
        model=GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        steps=2000,
        batch_size=64,
        eval_every=50,
        eval_batches=20,
        hyperparameters={
            "adamw": Hyperparameters(lr=2e-3),
            "muon": Hyperparameters(lr=0.02, adamw_lr=2e-3),
            "normuon": Hyperparameters(lr=0.02, adamw_lr=2e-3),
            "sophia": Hyperparameters(lr=1e-3),
        },
    ),
}

SOPHIA_HESSIAN_EVERY = 10  # k of the official recipe
SOPHIA_BETAS = (0.965, 0.99)
SOPHIA_WEIGHT_DECAY = 0.2  # the official GPT-2 recipe, on matrices only
ADAMW_WEIGHT_DECAY = 0.1
# Steps left out of tokens/s and ms per optimizer step: the first ones carry one-time costs (cuBLAS
# handles, Triton compiles, the allocator's growth), which would be charged to whichever optimizer ran first.
TIMING_WARMUP_STEPS = 3
FINAL_LR_FRACTION = 0.1


@dataclass
class RunResult:
    """What one optimizer's run measured; filled in as it trains, so an interrupted run still has data."""

    optimizer: str
    implementation: str
    hyperparameters: Hyperparameters
    steps_planned: int
    seed: int = 0
    steps_done: int = 0
    status: str = "running"  # running | finished | interrupted
    train_steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    final_train_loss: float | None = None
    final_validation_loss: float | None = None
    tokens_per_second: float | None = None
    ms_per_optimizer_step: float | None = None
    optimizer_state_bytes: int | None = None
    train_seconds: float = 0.0
    # fastoptim.diagnostics at every evaluation: stable rank / condition of the weights, momentum row
    # imbalance (what NorMuon fixes); for SophiaG also the fraction of coordinates whose step was
    # clipped, averaged over the steps since the previous evaluation (``sophia_clipped_fraction``).
    diagnostics: list[dict] = field(default_factory=list)
    sophia_clipped_fraction: float | None = None  # SophiaG: mean over all steps of the run

    @property
    def name(self) -> str:
        return DISPLAY_NAMES.get(self.optimizer, self.optimizer)

    @property
    def learning_rate(self) -> float:
        return self.hyperparameters.lr

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hyperparameters"] = self.hyperparameters.knobs(self.optimizer) if self.optimizer in KNOBS else {}
        return out


class ScheduledOptimizer:
    """An optimizer plus the peak rates of its groups, so the schedule scales from them (never compounds)."""

    def __init__(self, optimizer: torch.optim.Optimizer, implementation: str) -> None:
        self.optimizer = optimizer
        self.implementation = implementation
        # fastoptim's Muon groups resolve their rate when added: an AdamW group's "lr" is its adamw_lr.
        self._peaks = [group["lr"] for group in optimizer.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group, peak in zip(self.optimizer.param_groups, self._peaks):
            group["lr"] = peak * factor


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state`, counting each storage once (buffers may be views)."""
    seen: set[tuple[int, str]] = set()
    total = 0

    def visit(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), str(value.device))
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(list(optimizer.state.values()))
    return total


def lr_factor(
    step: int, total_steps: int, schedule: str = "cosine", phi: float = 2.0, warmup_fraction: float = 0.05
) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, then `schedule` (cosine, UBA with
    `phi`, or WSD with a linear decay over the last 20%) down to 10% of the peak (fastoptim.schedules)."""
    warmup = max(1, int(warmup_fraction * total_steps))
    return schedules.lr_multiplier(
        schedule, step, total_steps, warmup, phi=phi, min_lr_ratio=FINAL_LR_FRACTION, decay_fraction=0.2
    )


def _adamw_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Decay on matrices only (embeddings included, as nanoGPT does), never on norms."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str, model: GPT, hyperparameters: Hyperparameters, tokens_per_step: int, device: torch.device
) -> ScheduledOptimizer:
    """The optimizer `name` for `model` with its knobs from `hyperparameters`."""
    h = hyperparameters
    betas = (0.9, h.beta2)
    if name == "adamw":
        optimizer = torch.optim.AdamW(_adamw_groups(model, ADAMW_WEIGHT_DECAY), lr=h.lr, betas=betas)
        return ScheduledOptimizer(optimizer, "torch.optim.AdamW")
    if name in ("muon", "normuon"):
        cls = fastoptim.Muon if name == "muon" else fastoptim.NorMuon
        # bf16 matmuls are slow on CPUs; on a GPU Newton-Schulz runs in bf16 as the papers do.
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        optimizer = cls(
            fastoptim.param_groups(model), lr=h.lr, ns_dtype=ns_dtype, adamw_lr=h.adamw_lr, adamw_betas=betas
        )
        return ScheduledOptimizer(optimizer, f"fastoptim.{cls.__name__}")
    if name == "sophia":
        # The official GPT-2 recipe: weight decay 0.2 on matrices only, betas (0.965, 0.99), rho scaled
        # by the tokens per step (bs), gradient clipping (in `train`), Hessian every 10 steps.
        optimizer = fastoptim.SophiaG(
            _adamw_groups(model, SOPHIA_WEIGHT_DECAY), lr=h.lr, betas=SOPHIA_BETAS, rho=h.rho, bs=tokens_per_step
        )
        return ScheduledOptimizer(optimizer, "fastoptim.SophiaG")
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def sophia_clipped_fraction(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The fraction of SophiaG's coordinates whose last step was clipped, |m / max(rho·bs·h, eps)| >= 1,
    as a 0-dim device tensor (no host sync). Right after `step()` the state holds exactly the m and h
    that step used (m is updated before the clip, h only by `update_hessian`), so this is the count the
    op itself makes (`sophia_step_(..., return_unclipped=True)`), from the state, by
    `fastoptim.diagnostics.sophia_win_rate`."""
    unclipped, total = None, 0
    for group in optimizer.param_groups:
        states = [optimizer.state[p] for p in group["params"] if "exp_avg" in optimizer.state.get(p, {})]
        if not states:
            continue
        count = sum(s["exp_avg"].numel() for s in states)
        rate = diagnostics.sophia_win_rate(
            [s["exp_avg"] for s in states],
            [s["hessian"] for s in states],
            group["rho"] * group["bs"],
            group["eps"],
        )
        unclipped = rate * count if unclipped is None else unclipped + rate * count
        total += count
    if unclipped is None:
        raise ValueError("optimizer has no SophiaG state yet: call it after a step")
    return 1.0 - unclipped / total


@torch.no_grad()
def evaluate(
    model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast
) -> float:
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with autocast():
            total += language_model_loss(model(inputs.to(device)), targets.to(device)).item()
    model.train()
    return total / len(batches)


@dataclass
class Experiment:
    """Everything shared by the runs of one comparison: model, initial weights, data and budget."""

    preset: Preset
    steps: int
    seed: int
    device: torch.device
    split: Split
    lr_schedule: str = "cosine"
    phi: float = 2.0

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.initial_state = {k: v.clone() for k, v in GPT(self.preset.model).state_dict().items()}
        block = self.preset.model.block_size
        self.schedule = BatchSchedule(self.split.train, self.steps, self.preset.batch_size, block, self.seed)
        batch = self.preset.batch_size
        self.validation_batches = evaluation_batches(
            self.split.validation, self.preset.eval_batches, batch, block, self.seed + 1
        )
        self.train_eval_batches = evaluation_batches(
            self.split.train, self.preset.eval_batches, batch, block, self.seed + 2
        )
        # SophiaG's Hessian is estimated on fresh batches, drawn apart from the training stream (the
        # official script uses its prefetched next batch, which is likewise not the one just stepped on).
        self.hessian_schedule = BatchSchedule(
            self.split.train, self.steps // SOPHIA_HESSIAN_EVERY + 1, batch, block, self.seed + 3
        )

    @property
    def tokens_per_step(self) -> int:
        return self.preset.batch_size * self.preset.model.block_size

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def new_model(self) -> GPT:
        model = GPT(self.preset.model)
        model.load_state_dict(self.initial_state)
        return model.to(self.device)


def train(
    experiment: Experiment, run: RunResult, on_step: Callable[[RunResult, float], None] | None = None
) -> RunResult:
    """Train one optimizer, filling `run` as it goes (it holds valid partial numbers if interrupted)."""
    device = experiment.device
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(experiment.seed)  # SophiaG's label sampling draws from the global RNG
    model = experiment.new_model()
    knobs = run.hyperparameters
    scheduled = build_optimizer(run.optimizer, model, knobs, experiment.tokens_per_step, device)
    run.implementation = scheduled.implementation
    optimizer = scheduled.optimizer
    is_sophia = run.optimizer == "sophia"
    # SophiaG's clipped fraction: summed on the device every step, read only at evaluations.
    clipped_sum = torch.zeros((), device=device)
    clipped_steps = clipped_steps_before = 0
    clipped_total = 0.0
    step_seconds = timed_seconds = 0.0  # over the timed steps (after TIMING_WARMUP_STEPS)
    timed_steps = 0
    warmup_steps = TIMING_WARMUP_STEPS if experiment.steps > TIMING_WARMUP_STEPS else 0

    def record_evaluation(step: int) -> None:
        run.eval_steps.append(step)
        run.validation_losses.append(
            evaluate(model, experiment.validation_batches, device, experiment.autocast)
        )
        run.final_validation_loss = run.validation_losses[-1]
        record = {"step": step, **diagnostics.as_floats(diagnostics.optimizer_diagnostics(optimizer))}
        nonlocal clipped_sum, clipped_steps_before, clipped_total
        if clipped_steps > clipped_steps_before:
            clipped = clipped_sum.item()  # the one host sync of the clipped fraction, here only
            record["sophia_clipped_fraction"] = clipped / (clipped_steps - clipped_steps_before)
            clipped_total += clipped
            clipped_sum.zero_()
            clipped_steps_before = clipped_steps
            run.sophia_clipped_fraction = clipped_total / clipped_steps
        run.diagnostics.append(record)

    record_evaluation(0)
    for step in range(experiment.steps):
        start = time.perf_counter()
        inputs, targets = experiment.schedule.batch(step, device)
        scheduled.set_lr_factor(
            lr_factor(step, experiment.steps, experiment.lr_schedule, experiment.phi, knobs.warmup_fraction)
        )
        with experiment.autocast():
            loss = language_model_loss(model(inputs), targets)
        loss.backward()
        if knobs.grad_clip > 0:  # no host sync: the clip factor stays on the device
            torch.nn.utils.clip_grad_norm_(model.parameters(), knobs.grad_clip, foreach=True)
        synchronize()
        step_start = time.perf_counter()
        optimizer.step()
        synchronize()
        optimizer_seconds = time.perf_counter() - step_start
        optimizer.zero_grad(set_to_none=True)
        if is_sophia:
            clipped_sum += sophia_clipped_fraction(optimizer)
            clipped_steps += 1
        if is_sophia and (step + 1) % SOPHIA_HESSIAN_EVERY == 0 and step + 1 < experiment.steps:
            # Gauss-Newton-Bartlett: gradients of the loss on labels sampled from the model's own softmax.
            hessian_inputs, _ = experiment.hessian_schedule.batch((step + 1) // SOPHIA_HESSIAN_EVERY, device)
            with experiment.autocast():
                fastoptim.sophia_sampled_loss(model(hessian_inputs)).backward()
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        elapsed = time.perf_counter() - start
        run.train_seconds += elapsed
        run.steps_done = step + 1
        run.train_steps.append(step + 1)
        run.train_losses.append(loss_value)
        if step < warmup_steps:  # until timed steps exist, the numbers so far (an early Ctrl-C keeps some)
            run.tokens_per_second = run.steps_done * experiment.tokens_per_step / run.train_seconds
            run.ms_per_optimizer_step = 1e3 * optimizer_seconds
        else:
            timed_steps += 1
            timed_seconds += elapsed
            step_seconds += optimizer_seconds
            run.tokens_per_second = timed_steps * experiment.tokens_per_step / timed_seconds
            run.ms_per_optimizer_step = 1e3 * step_seconds / timed_steps
        run.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        if not math.isfinite(loss_value):
            run.status = "diverged"
            break
        if (step + 1) % experiment.preset.eval_every == 0 or step + 1 == experiment.steps:
            record_evaluation(step + 1)
        if on_step is not None:
            on_step(run, loss_value)
    run.final_train_loss = evaluate(model, experiment.train_eval_batches, device, experiment.autocast)
    if run.status == "running":
        run.status = "finished"
    return run


def steps_to_reach(run: RunResult, target: float) -> float | None:
    """The step at which `run`'s validation loss first reaches `target` (None if it never does),
    linearly interpolated between the evaluation that reached it and the one before, so the answer is
    not rounded up to the evaluation grid."""
    previous = None
    for step, loss in zip(run.eval_steps, run.validation_losses):
        if step > 0 and loss <= target:
            if previous is None or previous[1] <= loss:
                return float(step)
            before_step, before_loss = previous
            return before_step + (before_loss - target) / (before_loss - loss) * (step - before_step)
        previous = (step, loss)
    return None
