"""`python -m fastoptim compare`: train a small byte-level GPT on the bundled Jane Austen corpus with
AdamW, Muon, NorMuon and SophiaG (same model, seed, data order and token budget) and report loss,
training efficiency, throughput and optimizer-state memory.

Modules: `model` (the GPT), `data` (corpus, split, batches), `train` (loop, metrics, each optimizer's
knobs and the presets), `report` (table with mean ± sd over seeds, plot, JSON, CSV), `cli` (the
`compare` subcommand: its output is printed), `sweep` (`python -m fastoptim sweep`: the coordinate-wise
tuning the presets come from).
"""

from __future__ import annotations

from .data import BatchSchedule, corpus_tokens, load_corpus_bytes, train_validation_split
from .model import GPT, GPTConfig

__all__ = [
    "GPT",
    "BatchSchedule",
    "GPTConfig",
    "corpus_tokens",
    "load_corpus_bytes",
    "train_validation_split",
]
