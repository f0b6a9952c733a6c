"""model_best.pth: kept by one evaluation metric, in the chosen direction, across resume.

Evaluations return scripted values, so the best iteration is known in advance; the best
checkpoint's weights are compared with the periodic checkpoint taken at the same iteration.
"""
import json

import pytest
import torch

from helpers import TinyData, tiny_model
from test_engine import CrashAt

from detres.config import ConfigError
from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import Trainer, WarmupMultiStepSchedule
from detres.engine.best import BestTracker, flatten_metrics, metric_direction
from detres.engine.launch import run_records

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted:
    """An eval_fn returning ``{key: values[k]}`` on its k-th call (nested under ``nest``)."""

    def __init__(self, key, values, nest=None):
        self.key, self.values, self.nest, self.calls = key, list(values), nest, []

    def __call__(self, model):
        value = self.values[len(self.calls)]
        self.calls.append(value)
        results = {self.key: value, "num_images": 6}
        return {self.nest: results} if self.nest else results


def make_trainer(output_dir, max_iter, eval_fn, crash_at=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model, data = tiny_model(), TinyData()
    sampler = TrainingSampler(len(data), 8, seed=0)
    loader = make_loader(data, collate_fn=collate, batch_sampler=sampler)
    if crash_at is not None:
        loader = CrashAt(loader, crash_at)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    defaults = dict(log_period=4, checkpoint_period=4, eval_period=4, progress=False)
    return Trainer(model, optimizer, WarmupMultiStepSchedule(steps=()), loader,
                   max_iter=max_iter, output_dir=output_dir, sampler=sampler, eval_fn=eval_fn,
                   task="classification", **{**defaults, **kwargs})


def crash_after_two_evaluations(folder, values):
    """A 16-iteration run evaluating every 4 that crashes while fetching batch 9: its
    evaluations at 4 and 8 return ``values``; its last checkpoint holds 8 iterations."""
    first = make_trainer(folder, 16, Scripted("AP", values), crash_at=9, best_metric="AP")
    with pytest.raises(KeyboardInterrupt):
        first.run()
    first.close()


def best_entry(folder):
    return torch.load(folder / "model_best.pth", weights_only=True)["best"]


def assert_same_weights(a, b):
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_direction_rule():
    assert metric_direction("bbox/AP") == "max"
    assert metric_direction("bbox/mAP") == "max"
    assert metric_direction("top1_err") == "min"
    assert metric_direction("val/loss") == "min"
    assert metric_direction("top1_err", "max") == "max"
    assert metric_direction("bbox/AP", "min") == "min"
    with pytest.raises(ValueError, match="auto, max or min"):
        metric_direction("AP", "largest")


def test_flatten_names_nested_results_as_in_metrics_json():
    flat = flatten_metrics({"AP": 40.0, "ok": True, "per_class": {"cat": 38.0}}, "bbox")
    assert flat == {"bbox/AP": 40.0, "bbox/per_class/cat": 38.0}


def test_tracker_keeps_strictly_better_values_and_ignores_nan():
    tracker = BestTracker("top1_err")
    assert tracker.update({"top1_err": float("nan")}, 1) is False and tracker.value is None
    assert tracker.update({"top1_err": 50.0}, 2)
    assert not tracker.update({"top1_err": 50.0}, 3)          # a tie keeps the earlier one
    assert not tracker.update({"top1_err": float("nan")}, 4)
    assert tracker.update({"top1_err": 40.0}, 5)
    assert tracker.state_dict() == {"metric": "top1_err", "mode": "min", "value": 40.0,
                                    "iteration": 5}


def test_maximised_metric_keeps_the_best_iteration(tmp_path):
    # evaluations at 4, 8, 12 and the final one at 16
    trainer = make_trainer(tmp_path, 16, Scripted("AP", [10.0, 30.0, 20.0, 25.0]),
                           best_metric="bbox/AP", metrics_prefix="bbox")
    result = trainer.run()
    trainer.close()
    expected = {"metric": "bbox/AP", "mode": "max", "value": 30.0, "iteration": 8}
    assert result.best == expected and best_entry(tmp_path) == expected
    record = json.loads((tmp_path / "model_best.json").read_text())
    assert record == {**expected, "checkpoint": "model_best.pth"}
    ckpt = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert ckpt["iteration"] == 8
    assert_same_weights(tmp_path / "model_best.pth", tmp_path / "model_0000007.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(tmp_path.glob("*.tmp"))


def test_auto_minimises_an_error_and_the_final_evaluation_counts(tmp_path):
    trainer = make_trainer(tmp_path, 8, Scripted("top1_err", [50.0, 20.0]),
                           best_metric="top1_err")
    trainer.run()
    trainer.close()
    assert best_entry(tmp_path) == {"metric": "top1_err", "mode": "min", "value": 20.0,
                                    "iteration": 8}
    assert_same_weights(tmp_path / "model_best.pth", tmp_path / "model_final.pth")


def test_explicit_mode_overrides_the_name(tmp_path):
    trainer = make_trainer(tmp_path, 8, Scripted("top1_err", [50.0, 20.0]),
                           best_metric="top1_err", best_mode="max")
    trainer.run()
    trainer.close()
    assert best_entry(tmp_path)["value"] == 50.0 and best_entry(tmp_path)["iteration"] == 4


def test_resume_restores_the_best_so_a_worse_evaluation_does_not_replace_it(tmp_path):
    # evaluations at 4 (10) and 8 (30); the crash comes while fetching batch 9, so the last
    # checkpoint (after 8 iterations) was written before the evaluation at 8 saw 30
    crash_after_two_evaluations(tmp_path, [10.0, 30.0])
    assert torch.load(tmp_path / "model_0000007.pth", weights_only=True)["best"]["value"] == 10.0
    before = (tmp_path / "model_best.pth").read_bytes()

    resumed = make_trainer(tmp_path, 16, Scripted("AP", [20.0, 25.0]), best_metric="AP")
    assert resumed.resume() and resumed.iteration == 8
    assert resumed.best.value == 30.0 and resumed.best.iteration == 8
    result = resumed.run()                       # evaluations at 12 (20) and 16 (25)
    resumed.close()
    assert result.best["value"] == 30.0 and result.best["iteration"] == 8
    assert (tmp_path / "model_best.pth").read_bytes() == before
    # the best so far also travels in every checkpoint written after the resume
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["best"] == result.best


def test_best_in_checkpoint_alone_survives_resume(tmp_path):
    crash_after_two_evaluations(tmp_path, [30.0, 10.0])
    (tmp_path / "model_best.pth").unlink()      # e.g. copied elsewhere by the user
    resumed = make_trainer(tmp_path, 16, Scripted("AP", [20.0, 35.0]), best_metric="AP")
    resumed.resume()
    assert resumed.best.value == 30.0            # from model_0000007.pth's own entry
    result = resumed.run()
    resumed.close()
    assert result.best == {"metric": "AP", "mode": "max", "value": 35.0, "iteration": 16}


def test_unknown_metric_names_the_key_and_lists_what_exists(tmp_path):
    trainer = make_trainer(tmp_path, 4, Scripted("AP", [10.0]), best_metric="bbox/APx",
                           metrics_prefix="bbox")
    with pytest.raises(ConfigError, match=r"train.best_metric.*'bbox/APx'.*bbox/AP, "
                                          r"bbox/num_images"):
        trainer.run()


def test_best_metric_without_evaluation_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="best_metric.*does not evaluate"):
        make_trainer(tmp_path, 4, None, best_metric="AP")


def test_best_files_are_run_records(tmp_path):
    (tmp_path / "model_best.json").write_text("{}")
    (tmp_path / "model_best.pth").write_bytes(b"")
    assert [p.name for p in run_records(tmp_path)] == ["model_best.json", "model_best.pth"]


# ----------------------------------------------------------------------------- through the tools
def test_train_det_keeps_the_best_by_a_bbox_metric(tmp_path, monkeypatch):
    from helpers import load_tool

    from detres.data.builtin import ensure_builtin_shapes
    from detres.engine.logging import read_metrics

    cache = tmp_path / "cache"
    ensure_builtin_shapes(cache, num_train=8, num_val=4, image_size=64)
    monkeypatch.setenv("DETRES_CACHE", str(cache))
    out = tmp_path / "run"
    load_tool("train_det").main([
        "data.builtin.num_train=8", "data.builtin.num_val=4", "data.builtin.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "model.backbone.width=8", "model.backbone.depth=18",
        "solver.ims_per_batch=2", "solver.steps=[]", "solver.warmup_iters=0",
        "train.device=cpu", "train.num_workers=0", "train.num_threads=1", "train.max_iter=4",
        "train.checkpoint_period=2", "train.eval_period=2", "test.ims_per_batch=4",
        "model.roi_head.score_threshold=0.0", "train.best_metric=bbox/AP50",
        f"train.output_dir={out}"])
    evals = [r for r in read_metrics(out) if r["phase"] == "eval"]
    assert [r["iteration"] for r in evals] == [2, 4]
    # the oracle: the logged evaluations; the first of equal values is kept
    best = max(evals, key=lambda r: (r["AP50"], -r["iteration"]))
    record = json.loads((out / "model_best.json").read_text())
    assert record["metric"] == "bbox/AP50" and record["mode"] == "max"
    assert record["iteration"] == best["iteration"]
    assert record["value"] == pytest.approx(best["AP50"])
    assert torch.load(out / "model_best.pth", weights_only=True)["task"] == "detection"


def test_pretrain_cls_names_an_unknown_best_metric(tiny_cls_set, tmp_path):
    from helpers import load_tool, tiny_cls_args

    with pytest.raises(ConfigError) as e:
        load_tool("pretrain_cls").main(tiny_cls_args(
            tiny_cls_set, tmp_path / "run", "train.max_iter=2", "train.best_metric=top1_error",
            "train.num_threads=1"))
    assert str(e.value).startswith("train.best_metric") and "'top1_error'" in str(e.value)
    assert "top1_err, top5_err" in str(e.value)
