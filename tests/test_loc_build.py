"""tasks/localization/build.py: copy_classifier_weights starts the per-class RPN's trunk and the
R-CNN's network from the classification net (Appendix C fine-tunes the classification net); the
mismatch error is tested end to end in test_train_loc_tool.py."""
import pytest
import torch

from detres.config import ConfigError
from detres.models.classifier import Classifier
from detres.models.resnet import ResNet
from detres.tasks.localization.build import copy_classifier_weights


def _classifier(seed: int, width: int = 8) -> Classifier:
    torch.manual_seed(seed)
    net = ResNet(18, num_classes=3, width=width, norm="bn")
    with torch.no_grad():   # distinct BN statistics too, so that buffers are checked as well
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return Classifier(net, (100.0, 100.0, 100.0), (60.0, 60.0, 60.0))


def test_copy_into_a_c4_trunk_makes_every_trunk_tensor_the_classifiers():
    classifier = _classifier(0)
    trunk, _ = ResNet(18, width=8, norm="bn").c4_split()   # other random init
    source = classifier.net.state_dict()
    assert any(not torch.equal(v, source[k]) for k, v in trunk.state_dict().items())
    copy_classifier_weights(classifier, trunk, "rpn")
    own = trunk.state_dict()
    assert own and set(own) < set(source)                  # conv1..conv4_x, no layer4 / fc
    for name, value in own.items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    for name, p in trunk.named_parameters():               # a copy, not a shared tensor
        assert p.data_ptr() != classifier.net.get_parameter(name).data_ptr()


def test_copy_into_a_whole_resnet_without_fc():
    classifier = _classifier(1)
    torch.manual_seed(2)
    target = ResNet(18, num_classes=None, width=8, norm="bn")   # no fc, as the R-CNN's net
    copy_classifier_weights(classifier, target, "rcnn")
    source = classifier.net.state_dict()
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    x = torch.rand(1, 3, 64, 64) * 255
    classifier.eval()
    target.eval()
    with torch.no_grad():  # the same function: the classifier's conv5_x features
        torch.testing.assert_close(target(x), classifier.net.forward_features(x)["res5"])


def test_another_width_is_a_config_error_naming_the_stage():
    classifier = _classifier(0)
    trunk, _ = ResNet(18, width=16, norm="bn").c4_split()
    with pytest.raises(ConfigError, match="rcnn.init_from_classifier.*rcnn.backbone"):
        copy_classifier_weights(classifier, trunk, "rcnn")


@pytest.mark.parametrize("form", ["state_dict", "backbone_file"])
def test_a_classifier_weights_file_is_read_once_and_loaded_whole(tmp_path, monkeypatch, form):
    from detres.config import load_config
    from detres.tasks.common import build_backbone
    from detres.tasks.localization.build import build_loc_classifier
    from detres.tasks.localization.config import LocalizationConfig
    cfg = load_config("loc_r18_builtin.yaml", [], schema=LocalizationConfig)
    torch.manual_seed(3)
    net = build_backbone(cfg.classifier.backbone, 5)
    path = tmp_path / "cls.pth"
    state = net.state_dict()
    torch.save(state if form == "state_dict" else {"model": state, "arch": net.arch()}, path)
    cfg = load_config("loc_r18_builtin.yaml", [f"classifier.weights={path}"],
                      schema=LocalizationConfig)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    model = build_loc_classifier(cfg, 5)
    assert reads == [str(path)]
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
