"""The corpus that ships with fastoptim, its train/validation split, and deterministic batches.

The corpus is Jane Austen's six novels (public domain; see fastoptim/data/PROVENANCE.md), stored
xz-compressed and read with the standard library: nothing is downloaded. Tokens are UTF-8 bytes
(vocabulary 256), so no tokenizer or vocabulary file is needed.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

CORPUS_FILE = "austen.txt.xz"
CORPUS_NAME = "Jane Austen, six novels (Project Gutenberg texts via the janeaustenr package)"
VALIDATION_FRACTION = 0.05


@lru_cache(maxsize=1)
def load_corpus_bytes() -> bytes:
    """The whole corpus as UTF-8 bytes (about 4 MB once decompressed)."""
    compressed = resources.files("fastoptim.data").joinpath(CORPUS_FILE).read_bytes()
    return lzma.decompress(compressed)


def corpus_tokens() -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of byte tokens."""
    return torch.frombuffer(bytearray(load_corpus_bytes()), dtype=torch.uint8)


@dataclass(frozen=True)
class Split:
    train: torch.Tensor
    validation: torch.Tensor


def train_validation_split(tokens: torch.Tensor, validation_fraction: float = VALIDATION_FRACTION) -> Split:
    """The last `validation_fraction` of the corpus (the end of *Persuasion*) is held out, contiguously,
    so no validation window overlaps a training window."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    cut = int(len(tokens) * (1.0 - validation_fraction))
    return Split(train=tokens[:cut], validation=tokens[cut:])


class BatchSchedule:
    """Every batch of a run, fixed up front by a seed: batch `i` is the same for every optimizer.

    The window offsets of all steps are drawn from one `torch.Generator`, so the data order depends on
    the seed only (not on the global RNG, the device, or what ran before).
    """

    def __init__(self, tokens: torch.Tensor, steps: int, batch_size: int, block_size: int, seed: int) -> None:
        if len(tokens) <= block_size + 1:
            raise ValueError(f"need more than block_size + 1 = {block_size + 1} tokens, got {len(tokens)}")
        generator = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        self.block_size = block_size
        self.offsets = torch.randint(
            0, len(tokens) - block_size - 1, (steps, batch_size), generator=generator
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of step `step`, each (batch_size, block_size) int64."""
        return windows(self.tokens, self.offsets[step], self.block_size, device)


def windows(
    tokens: torch.Tensor, offsets: torch.Tensor, block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    index = offsets[:, None] + torch.arange(block_size + 1)
    chunk = tokens[index].long()
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def evaluation_batches(
    tokens: torch.Tensor, num_batches: int, batch_size: int, block_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of CPU batches to measure loss on; the same for every optimizer and every evaluation."""
    schedule = BatchSchedule(tokens, num_batches, batch_size, block_size, seed)
    return [schedule.batch(i) for i in range(num_batches)]
