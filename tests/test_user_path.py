"""What a new user meets on the way from the demo to their own runs (one line each, before
anything is written)."""
import pytest

from helpers import ROOT, run_tool_script


@pytest.mark.parametrize("extra", [[], ["model.weights=null"]])
def test_frozen_bn_without_pretrained_weights_is_refused_with_the_way_out(tmp_path, extra):
    res = run_tool_script("train_det", str(ROOT / "configs" / "frcnn_r101_coco.yaml"),
                          "model.backbone.weights=null", *extra, "train.device=cpu",
                          f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.backbone.norm = frozen_bn")
    assert "model.backbone.norm=gn" in lines[0] and "model.backbone.weights=" in lines[0]
    assert not (tmp_path / "run").exists()
