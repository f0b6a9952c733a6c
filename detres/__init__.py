"""detres: Faster R-CNN on deep residual networks (He et al. 2015, arXiv:1512.03385)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Predictor pulls in the models and data stack; import it only when asked for.
    if name == "Predictor":
        from detres.tasks.detection.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'detres' has no attribute {name!r}")
