"""ImageNet localization with a per-class RPN and an R-CNN stage (He et al. 2015, Appendix C)."""
from detres.tasks.localization.config import LocalizationConfig
from detres.tasks.localization.config import LocalizationConfig as Config
from detres.tasks.localization.run import evaluate, train

__all__ = ["Config", "LocalizationConfig", "evaluate", "train"]
