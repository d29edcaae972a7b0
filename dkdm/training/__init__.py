"""What every training loop shares: the trainer, precision modes, checkpoint files."""

from dkdm.training.checkpoint import atomic_save, find_resume_checkpoint, seed_all
from dkdm.training.precision import Precision
from dkdm.training.trainer import (
    Trainer,
    batches_from_stream,
    diffusion_loss_fn,
    parse_ema_rates,
)

__all__ = [
    "Precision",
    "Trainer",
    "atomic_save",
    "batches_from_stream",
    "diffusion_loss_fn",
    "find_resume_checkpoint",
    "parse_ema_rates",
    "seed_all",
]
