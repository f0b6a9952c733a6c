"""Models: the ResNet family (resnet.py); the detector parts live in their own modules."""
from detres.models.norm import FrozenBatchNorm2d
from detres.models.resnet import FeatureSpec, ResNet, ResNetHead, ResNetTrunk
from detres.models.weights import (WeightsMismatchError, WeightsNotFoundError, check_state_dict,
                                   load_weights, read_state_dict)

__all__ = ["FeatureSpec", "FrozenBatchNorm2d", "ResNet", "ResNetHead", "ResNetTrunk",
           "WeightsMismatchError", "WeightsNotFoundError", "check_state_dict", "load_weights",
           "read_state_dict"]
