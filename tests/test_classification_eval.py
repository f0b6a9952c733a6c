"""Top-1 / top-5 error against hand-computed cases; 10-crop score averaging."""
import pytest
import torch

from detres.evaluation.classification import ClassificationEvaluator, count_topk_errors
from detres.models.classifier import ClassifierOutput
from detres.tasks.classification.run import evaluate_classifier


def test_topk_hand_computed():
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 right
        [0.1, 0.5, 0.4, 0.0, 0.0, 0.0],   # label 2: 2nd -> top-1 wrong, top-5 right
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 5: 6th -> wrong in both
        [0.0, 0.0, 0.0, 0.1, 0.2, 0.7],   # label 3: 3rd -> top-1 wrong, top-5 right
    ])
    labels = torch.tensor([0, 2, 5, 3])
    assert count_topk_errors(scores, labels) == {1: 3, 5: 1}


def test_fewer_than_five_classes_clamps_k():
    assert count_topk_errors(torch.tensor([[0.2, 0.8]]), torch.tensor([0])) == {1: 1, 5: 0}


def test_evaluator_reports_percent():
    ev = ClassificationEvaluator()
    ev.process((None, torch.tensor([0, 1, 2, 0])), torch.eye(4))     # one top-1 error in 4
    assert ev.evaluate() == {"top1_err": pytest.approx(25.0), "top5_err": 0.0, "num_images": 4}
    with pytest.raises(ValueError, match="no images"):
        ClassificationEvaluator().evaluate()


class FixedLogits(torch.nn.Module):
    """Logits = the first pixel of each of 3 channels."""

    def forward(self, images):
        return ClassifierOutput(images[:, :, 0, 0].float())


def test_evaluate_classifier_single_and_ten_crop():
    images = torch.zeros(2, 3, 4, 4)
    images[0, 1, 0, 0] = 5.0                                         # image 0 -> class 1
    images[1, 2, 0, 0] = 5.0                                         # image 1 -> class 2
    loader = [(images, torch.tensor([1, 0]))]
    assert evaluate_classifier(FixedLogits(), loader)["top1_err"] == pytest.approx(50.0)
    crops = torch.zeros(1, 10, 3, 4, 4)
    crops[0, :4, 0, 0, 0] = 9.0                                      # 4 crops vote class 0 hard
    crops[0, 4:, 1, 0, 0] = 1.0                                      # 6 crops lean to class 1
    result = evaluate_classifier(FixedLogits(), [(crops, torch.tensor([0]))])
    assert result["top1_err"] == 0.0                                 # softmax mean favours 0


class FailsOnSecondBatch(FixedLogits):
    """Records the mode it runs in; raises on its second call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.modes = 0, []

    def forward(self, images):
        self.calls += 1
        self.modes.append((self.training, torch.is_grad_enabled()))
        if self.calls == 2:
            raise RuntimeError("boom")
        return super().forward(images)


def test_evaluate_classifier_restores_train_mode_when_the_model_raises():
    model = FailsOnSecondBatch().train()
    batch = (torch.zeros(1, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_classifier(model, [batch, batch, batch])
    assert model.training and model.calls == 2
    assert model.modes == [(False, False)] * 2                       # eval mode, no autograd
