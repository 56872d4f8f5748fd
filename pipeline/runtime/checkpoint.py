"""Training state saved so that a killed run resumes as if it had never stopped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to save training state, and what it must match to be resumed."""

    folder: Path
    every: int  # steps (GAN) or epochs (fine-tuning) between checkpoints
    fingerprint: str  # of the data and the settings that shape training; a checkpoint with another is ignored
