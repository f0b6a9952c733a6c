"""The files a task writes besides every run's records (docs/architecture.md, Run folder): the
task names them to setup_run, env.json records them, and train.overwrite removes exactly those;
an env.json whose records would reach outside the run's own names is no run's. And the layering
that keeps it so (docs/architecture.md, Layers): the engine names no task's files, and no task
imports another."""
import ast
import json
from pathlib import Path

import pytest
from helpers import imported_modules

import detres
from detres.config import ConfigError
from detres.engine.run_folder import ENV_FILE, clear_for_fresh_run, recorded_run

LEGACY = {"git_revision": "abc", "torch": "2", "argv": []}


def write_run(folder: Path, run: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENV_FILE).write_text(json.dumps({**LEGACY, "run": run}))


def test_overwrite_removes_the_recorded_task_files_and_nothing_else(tmp_path):
    write_run(tmp_path, {"mode": "train", "stages": ["rcnn"],
                         "records": ["rcnn/proposals.pth", "rcnn/proposals.rank[0-9]*.npy",
                                     "weights/extra.bin"]})
    for name in ("rcnn/proposals.pth", "rcnn/proposals.rank0.npy", "rcnn/proposals.rank1.npy",
                 "weights/extra.bin", "model_final.pth", "rcnn/notes.txt",
                 "rcnn/proposals.rankA.npy", "weights/mine.bin", "backbone.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    clear_for_fresh_run(tmp_path, overwrite=True, stages=["rcnn"])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    # backbone.pth: no record of this run's, and the engine knows no task's names
    assert left == ["backbone.pth", "rcnn/notes.txt", "rcnn/proposals.rankA.npy",
                    "weights/mine.bin"]


def test_pretraining_records_its_backbone_file(finished_cls_run):
    run = json.loads((finished_cls_run / ENV_FILE).read_text())["run"]
    assert run == {"mode": "train", "stages": [], "records": ["backbone.pth"]}
    assert (finished_cls_run / "backbone.pth").is_file()


def test_the_new_runs_own_records_are_replaced_too(tmp_path):
    write_run(tmp_path, {"mode": "train", "stages": []})     # before env.json named records
    (tmp_path / "backbone.pth").write_text("old")
    with pytest.raises(ConfigError, match="already holds a run"):
        clear_for_fresh_run(tmp_path, overwrite=False, stages=[], records=["backbone.pth"])
    clear_for_fresh_run(tmp_path, overwrite=True, stages=[], records=["backbone.pth"])
    assert not (tmp_path / "backbone.pth").exists()


@pytest.mark.parametrize("record", ["*", "../outside.txt", "/etc/passwd", "a/../../b", "a//b",
                                    "[a-z]*", "x\\..\\y", 3, ""])
def test_records_that_reach_beyond_the_runs_names_are_no_runs(tmp_path, record):
    write_run(tmp_path, {"mode": "train", "stages": [], "records": [record]})
    (tmp_path / "thesis.tex").write_text("mine")
    assert recorded_run(tmp_path) is None
    with pytest.raises(ConfigError, match="holds no detres run"):
        clear_for_fresh_run(tmp_path, overwrite=True, stages=[])
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def _code_strings(path: Path) -> list[str]:
    """The string literals of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_engine_names_no_task_and_no_task_imports_another():
    """docs/architecture.md, Layers: the engine is task-free; tasks share through common.py."""
    root = Path(detres.__file__).parent
    for path in (root / "engine").glob("*.py"):
        assert not any(m.startswith("detres.tasks") for m in imported_modules(path)), path.name
        named = [s for s in _code_strings(path) if "backbone.pth" in s or "proposals" in s]
        assert named == [], path.name
    tasks = [p.name for p in (root / "tasks").iterdir() if (p / "__init__.py").is_file()]
    for task in tasks:
        for path in (root / "tasks" / task).glob("*.py"):
            others = {m for m in imported_modules(path) for t in tasks
                      if t != task and m.startswith(f"detres.tasks.{t}")}
            assert others == set(), f"tasks/{task}/{path.name} imports {sorted(others)}"
