"""fastoptim where users train: Hugging Face transformers.Trainer and PyTorch Lightning.

Offline and small: a tiny GPT-2 built from a GPT2Config (no download, no tokenizer), a few steps on a fixed
set of random token sequences, on the CPU. Each checks that the framework steps fastoptim's optimizer (not
one of its own), that the loss on the training data goes down, and that the scheduler's lr reaches every
group of the optimizer (the Muon/NorMuon matrix groups and their AdamW group alike).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastoptim

transformers = pytest.importorskip("transformers", reason="the [test] extra installs transformers")
pl = pytest.importorskip("pytorch_lightning", reason="the [test] extra installs pytorch-lightning")

VOCAB, TIME, STEPS = 64, 16, 8


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=TIME, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def random_tokens(n: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, TIME), generator=torch.Generator().manual_seed(1))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss.item()
    model.train()
    return loss


def schedule(step: int) -> float:
    """Warm-up then decay: every step has its own factor, so a stale lr is seen."""
    return min(1.0, (step + 1) / 3) * (0.9**step)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class LrRecorder:
    """Each optimizer step's learning rates, as the optimizer held them when it stepped."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen: list[list[float]] = []
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.seen.append([float(g["lr"]) for g in opt.param_groups])
        )


def check_lrs(recorder: LrRecorder, base_lrs: list[float], steps: int) -> None:
    assert len(recorder.seen) == steps
    for step, lrs in enumerate(recorder.seen):
        assert lrs == pytest.approx([base * schedule(step) for base in base_lrs], rel=1e-6)


# One optimizer per framework keeps the file fast; NorMuon under Trainer takes the transposed (Conv1D) apply path.
@pytest.mark.parametrize("cls", [fastoptim.NorMuon])
def test_transformers_trainer(cls, tmp_path):
    model = tiny_gpt2()
    tokens = random_tokens()
    optimizer = cls(fastoptim.param_groups(model), lr=0.02, adamw_lr=3e-3)
    views = [(g["use_muon"], g["matrix_view"]) for g in optimizer.param_groups]
    assert views == [(True, "transposed"), (False, "auto")]  # GPT-2's Conv1D weights, then AdamW
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    recorder = LrRecorder(optimizer)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_grad_norm=1.0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(tokens), optimizers=(optimizer, scheduler)
    )
    before = lm_loss(model, tokens)
    trainer.train()
    after = lm_loss(model, tokens)
    assert trainer.optimizer is optimizer or getattr(trainer.optimizer, "optimizer", None) is optimizer
    check_lrs(recorder, base_lrs, STEPS)
    assert after < before - 0.1, (before, after)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class LitGPT2(pl.LightningModule):
    def __init__(self, cls: type) -> None:
        super().__init__()
        self.model = tiny_gpt2()
        self.cls = cls
        self.recorder: LrRecorder | None = None

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        optimizer = self.cls(fastoptim.param_groups(self.model), lr=0.02, adamw_lr=3e-3)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.recorder = LrRecorder(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("cls", [fastoptim.Muon])
def test_pytorch_lightning(cls, tmp_path):
    module = LitGPT2(cls)
    tokens = random_tokens()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    before = lm_loss(module.model, tokens)
    trainer.fit(module, loader)
    after = lm_loss(module.model, tokens)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, cls)
    check_lrs(module.recorder, module.base_lrs, STEPS)
    assert after < before - 0.1, (before, after)
