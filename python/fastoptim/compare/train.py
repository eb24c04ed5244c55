"""The training loop of `python -m fastoptim compare` and the numbers it measures.

Every optimizer trains the same model from the same initial weights on the same batches in the same
order, for the same number of steps, under the same learning-rate shape (linear warm-up, cosine decay
to 10%); only the optimizer and its peak learning rate differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

import fastoptim
from fastoptim import diagnostics, schedules

from .data import BatchSchedule, Split, evaluation_batches
from .model import GPT, GPTConfig, language_model_loss

OPTIMIZERS = ("adamw", "muon", "normuon", "sophia")
DISPLAY_NAMES = {"adamw": "AdamW", "muon": "Muon", "normuon": "NorMuon", "sophia": "SophiaG"}


@dataclass(frozen=True)
class Preset:
    """A model and a token budget sized for a device."""

    model: GPTConfig
    steps: int
    batch_size: int
    eval_every: int
    eval_batches: int
    learning_rates: dict[str, float]


# Peak learning rates of the CPU preset: the best of a small sweep at 300 steps, seed 0 (AdamW 1e-3..1.2e-2,
# Muon/NorMuon 0.015..0.06, SophiaG 2.5e-4..4e-3, factors of ~2). The quick and cuda rates are untuned
# guesses. The AdamW part of Muon and NorMuon (embeddings, head, norms) uses the AdamW rate.
PRESETS = {
    "quick": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64),
        steps=60,
        batch_size=16,
        eval_every=10,
        eval_batches=4,
        learning_rates={"adamw": 4e-3, "muon": 0.04, "normuon": 0.04, "sophia": 2e-3},
    ),
    "cpu": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128),
        steps=300,
        batch_size=32,
        eval_every=25,
        eval_batches=6,
        learning_rates={"adamw": 2e-3, "muon": 0.03, "normuon": 0.03, "sophia": 2.5e-4},
    ),
    "cuda": Preset(
        model=GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        steps=2000,
        batch_size=64,
        eval_every=100,
        eval_batches=20,
        learning_rates={"adamw": 2e-3, "muon": 0.02, "normuon": 0.02, "sophia": 1e-3},
    ),
}

SOPHIA_HESSIAN_EVERY = 10
# Steps left out of tokens/s and ms per optimizer step: the first ones carry one-time costs (cuBLAS
# handles, Triton compiles, the allocator's growth), which would be charged to whichever optimizer ran first.
TIMING_WARMUP_STEPS = 3
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1


@dataclass
class RunResult:
    """What one optimizer's run measured; filled in as it trains, so an interrupted run still has data."""

    optimizer: str
    implementation: str
    learning_rate: float
    adamw_learning_rate: float  # the AdamW part of Muon / NorMuon (embeddings, head, norms)
    steps_planned: int
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
    # imbalance (what NorMuon fixes), Sophia's unclipped fraction.
    diagnostics: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return DISPLAY_NAMES.get(self.optimizer, self.optimizer)

    def to_dict(self) -> dict:
        return asdict(self)


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


def lr_factor(step: int, total_steps: int, schedule: str = "cosine", phi: float = 2.0) -> float:
    """Linear warm-up over the first 5% of steps, then `schedule` (cosine, UBA with `phi`, or WSD with a
    linear decay over the last 20%) down to 10% of the peak (fastoptim.schedules)."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
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
    name: str, model: GPT, lr: float, adamw_lr: float, tokens_per_step: int, device: torch.device
) -> ScheduledOptimizer:
    """The optimizer `name` for `model` with peak rate `lr` (and `adamw_lr` for a Muon's AdamW part)."""
    betas = (0.9, 0.95)
    if name == "adamw":
        optimizer = torch.optim.AdamW(_adamw_groups(model, 0.1), lr=lr, betas=betas)
        return ScheduledOptimizer(optimizer, "torch.optim.AdamW")
    if name in ("muon", "normuon"):
        cls = fastoptim.Muon if name == "muon" else fastoptim.NorMuon
        # bf16 matmuls are slow on CPUs; on a GPU Newton-Schulz runs in bf16 as the papers do.
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        optimizer = cls(
            fastoptim.param_groups(model), lr=lr, ns_dtype=ns_dtype, adamw_lr=adamw_lr, adamw_betas=betas
        )
        return ScheduledOptimizer(optimizer, f"fastoptim.{cls.__name__}")
    if name == "sophia":
        optimizer = fastoptim.SophiaG(
            _adamw_groups(model, 0.1), lr=lr, betas=(0.965, 0.99), rho=0.04, bs=tokens_per_step
        )
        return ScheduledOptimizer(optimizer, "fastoptim.SophiaG")
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


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
    scheduled = build_optimizer(
        run.optimizer, model, run.learning_rate, run.adamw_learning_rate, experiment.tokens_per_step, device
    )
    run.implementation = scheduled.implementation
    optimizer = scheduled.optimizer
    is_sophia = run.optimizer == "sophia"
    step_seconds = timed_seconds = 0.0  # over the timed steps (after TIMING_WARMUP_STEPS)
    timed_steps = 0
    warmup_steps = TIMING_WARMUP_STEPS if experiment.steps > TIMING_WARMUP_STEPS else 0

    def record_evaluation(step: int) -> None:
        run.eval_steps.append(step)
        run.validation_losses.append(
            evaluate(model, experiment.validation_batches, device, experiment.autocast)
        )
        run.final_validation_loss = run.validation_losses[-1]
        run.diagnostics.append({"step": step, **diagnostics.as_floats(diagnostics.optimizer_diagnostics(optimizer))})

    record_evaluation(0)
    for step in range(experiment.steps):
        start = time.perf_counter()
        inputs, targets = experiment.schedule.batch(step, device)
        scheduled.set_lr_factor(lr_factor(step, experiment.steps, experiment.lr_schedule, experiment.phi))
        with experiment.autocast():
            loss = language_model_loss(model(inputs), targets)
        loss.backward()
        synchronize()
        step_start = time.perf_counter()
        optimizer.step()
        synchronize()
        optimizer_seconds = time.perf_counter() - step_start
        optimizer.zero_grad(set_to_none=True)
        if is_sophia and (step + 1) % SOPHIA_HESSIAN_EVERY == 0:
            # Gauss-Newton-Bartlett: gradients of the loss on labels sampled from the model's own softmax.
            with experiment.autocast():
                fastoptim.sophia_sampled_loss(model(inputs)).backward()
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


def steps_to_reach(run: RunResult, target: float) -> int | None:
    """The first evaluated step at which `run`'s validation loss is at or below `target` (None if never)."""
    for step, loss in zip(run.eval_steps, run.validation_losses):
        if step > 0 and loss <= target:
            return step
    return None
