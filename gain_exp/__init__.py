"""gain-exp: Hydra-configured experiments for GAIN (Guided Attention Inference Network)."""

from importlib.metadata import PackageNotFoundError, version

from gain_exp.config import schema as _schema  # noqa: F401  registers the config schemas that conf/ refers to
from gain_exp.core import models as _models  # noqa: F401  registers the small CNNs with timm

try:
    __version__ = version("gain-exp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
