from gain_exp import models as _models  # noqa: F401  registers the small CNNs with timm
