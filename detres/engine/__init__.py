"""Training engine shared by classification, detection and localization (see loop.py)."""
from detres.engine.checkpoint import (Checkpointer, CheckpointError, atomic_save,
                                      extract_backbone, read_checkpoint)
from detres.engine.loop import (NonFiniteGradientError, NonFiniteLossError, Trainer,
                                TrainResult, move_to_device)
from detres.engine.precise_bn import recompute_bn_stats
from detres.engine.schedule import WarmupMultiStepSchedule, lr_factor_at

__all__ = ["Checkpointer", "CheckpointError", "NonFiniteGradientError", "NonFiniteLossError",
           "Trainer", "TrainResult",
           "WarmupMultiStepSchedule", "atomic_save", "extract_backbone", "read_checkpoint",
           "lr_factor_at", "move_to_device", "recompute_bn_stats"]
