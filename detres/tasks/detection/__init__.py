"""Faster R-CNN with the C4 layout (He et al. 2015, Appendix A): schema, build, runs."""
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.config import DetectionConfig as Config
from detres.tasks.detection.run import evaluate, train

__all__ = ["Config", "DetectionConfig", "evaluate", "train"]
