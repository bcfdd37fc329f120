"""Public alias: ``from gain_exp.losses import GAINLoss`` (the module lives in ``gain_exp.core.losses``)."""

from gain_exp.core.losses import LOSS_NAMES, GAINLoss

__all__ = ["GAINLoss", "LOSS_NAMES"]
