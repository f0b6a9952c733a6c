"""The presets are package data: a non-editable install runs them by name from any folder,
and the checkout's configs/ path keeps working."""
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

from detres.config import PRESETS, ConfigError, load_config, preset_path
from detres.tasks.detection.config import DetectionConfig


def test_a_preset_is_found_by_name_and_by_its_checkout_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # no configs/ folder here
    for name in ("frcnn_r101_coco.yaml", "frcnn_r101_coco", "configs/frcnn_r101_coco.yaml"):
        assert preset_path(name) == PRESETS / "frcnn_r101_coco.yaml"
    cfg = load_config("frcnn_r101_coco_appb.yaml", schema=DetectionConfig)   # has a base:
    assert cfg.model.roi_head.global_context and cfg.model.backbone.depth == 101
    (tmp_path / "frcnn_r101_coco.yaml").write_text("train:\n  max_iter: 7\n")
    assert load_config("frcnn_r101_coco.yaml", schema=DetectionConfig).train.max_iter == 7
    with pytest.raises(ConfigError, match="nor a preset of that name; the presets: .*frcnn_r18"):
        load_config("frcnn_r1O1_coco.yaml", schema=DetectionConfig)
    with pytest.raises(ConfigError, match="does not exist"):   # a path elsewhere stays a path
        load_config("elsewhere/frcnn_r101_coco.yaml", schema=DetectionConfig)


def test_the_checkout_configs_folder_is_the_package_presets():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == \
        sorted(p.name for p in PRESETS.glob("*.yaml"))


@pytest.mark.timeout(300)
def test_a_non_editable_install_runs_the_default_config(tmp_path):
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # a copy of the sources: the build writes its build/ folder beside them
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "detres", source / "detres",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("detres-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("detres/configs/")}
    assert {f"detres/configs/{p.name}" for p in PRESETS.glob("*.yaml")} == shipped
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("from detres.cli import CONFIGS; from detres.config import load_config; "
            "from detres.tasks.detection.config import DetectionConfig; "
            "import detres; print(detres.__file__); "
            "print(load_config(CONFIGS / 'frcnn_r18_shapes.yaml', schema=DetectionConfig)"
            ".model.backbone.depth, load_config('frcnn_r101_coco.yaml', "
            "schema=DetectionConfig).model.backbone.depth)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(site), "PATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    where, depths = run.stdout.split("\n")[:2]
    assert where.startswith(str(site)) and depths == "18 101"
