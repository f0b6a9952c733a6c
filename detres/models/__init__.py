"""Models: the ResNet family (resnet.py); the detector parts live in their own modules."""
from detres.models.norm import FrozenBatchNorm2d
from detres.models.resnet import FeatureSpec, ResNet, ResNetHead, ResNetTrunk

__all__ = ["FeatureSpec", "FrozenBatchNorm2d", "ResNet", "ResNetHead", "ResNetTrunk"]
