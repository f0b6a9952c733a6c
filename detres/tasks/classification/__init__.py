"""ResNet pretraining by image classification (He et al. 2015, Sec 3.4 and 4.2)."""
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.classification.config import ClassificationConfig as Config
from detres.tasks.classification.run import evaluate, train

__all__ = ["Config", "ClassificationConfig", "evaluate", "train"]
