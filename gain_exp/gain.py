"""Public alias: ``from gain_exp.gain import GAIN`` (the module lives in ``gain_exp.core.gain``)."""

from gain_exp.core.gain import GAIN, GRAD_MODES, GAINOutput

__all__ = ["GAIN", "GAINOutput", "GRAD_MODES"]
