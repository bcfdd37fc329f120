"""Learning-rate schedules beyond torch's own classes, built like them from ``trainer.scheduler`` (``_target_``)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    T_max: int,
    warmup_epochs: int = 1,
    start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> LRScheduler:
    """A linear warm-up from ``start_factor`` x lr over ``warmup_epochs``, then a cosine decay to ``eta_min`` over
    the remaining ``T_max - warmup_epochs`` epochs (torch's LinearLR then CosineAnnealingLR)."""
    if not 1 <= warmup_epochs < T_max:
        raise ValueError(
            f"trainer.scheduler.warmup_epochs={warmup_epochs} must be >= 1 and below T_max={T_max} (the epochs); "
            f"shorten the warm-up or train longer."
        )
    if not 0 < start_factor <= 1:
        raise ValueError(f"trainer.scheduler.start_factor={start_factor} must be in (0, 1].")
    warmup = LinearLR(optimizer, start_factor=start_factor, total_iters=warmup_epochs)
    decay = CosineAnnealingLR(optimizer, T_max=T_max - warmup_epochs, eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_epochs])
