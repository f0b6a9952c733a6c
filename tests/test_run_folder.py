"""The run folder (docs/architecture.md, Run folder) through tools/pretrain_cls.py on a tiny
set: a fresh run refuses a folder that holds a run and leaves it byte-identical, --resume and
train.overwrite=true are the ways on, evaluation-only runs write into their own sub-folders, and
run.lock keeps a second process out (a stale lock is taken over)."""
import json
import shutil
import socket
import subprocess

import pytest

from helpers import load_tool, short_cls_run_args as run_args

from detres.config import ConfigError
from detres.engine.launch import LOCK_FILE
from detres.engine.logging import read_metrics

pretrain_cls = load_tool("pretrain_cls")

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder, skip=()):
    """Every file under ``folder`` (but the top-level entries ``skip``) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def train_iterations(out):
    return [r["iteration"] for r in read_metrics(out) if r["phase"] == "train"]


def test_fresh_run_into_a_used_folder_refuses_and_leaves_it_untouched(
        tiny_cls_set, finished_cls_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_cls_run, out)
    before = snapshot(out)
    assert "model_0000000.pth" in before and "last_checkpoint" in before and LOCK_FILE not in before
    with pytest.raises(ConfigError) as e:
        pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=3"))
    message = str(e.value)
    assert str(out) in message and "\n" not in message
    for way in ("--resume", "train.output_dir=", "train.overwrite=true"):
        assert way in message
    assert snapshot(out) == before


def test_a_stage_sub_folder_counts_as_a_run(tiny_cls_set, tmp_path):
    (tmp_path / "run" / "rpn").mkdir(parents=True)      # a localization run's stage
    (tmp_path / "run" / "rpn" / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain_cls.main(run_args(tiny_cls_set, tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["rpn"]


def test_a_run_stopped_before_its_first_step_is_replaced(tiny_cls_set, tmp_path):
    out = tmp_path / "run"
    missing = ("data.train.type=imagefolder", "data.val.type=imagefolder")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        pretrain_cls.main(run_args(tmp_path / "no_data", out, *missing))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "env.json", "log.txt"]
    pretrain_cls.main(run_args(tiny_cls_set, out))
    assert train_iterations(out) == [1, 2]
    assert (out / "log.txt").read_text().count("records in") == 1   # a log of this run only
    assert "no_data" not in (out / "config.yaml").read_text()


def test_resume_continues_the_run_in_the_folder(tiny_cls_set, finished_cls_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_cls_run, out)
    pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=3", "--resume"))
    assert train_iterations(out) == [1, 2, 3]
    assert not (out / LOCK_FILE).exists()                 # released when the run ends


def test_overwrite_leaves_nothing_of_the_old_run(tiny_cls_set, finished_cls_run, tmp_path):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    shutil.copytree(finished_cls_run, out)
    pretrain_cls.main(run_args(tiny_cls_set, out, "--eval-only", "--weights",
                           str(out / "model_final.pth")))
    new = ("train.max_iter=1", "train.checkpoint_period=100", "train.seed=3")
    pretrain_cls.main(run_args(tiny_cls_set, out, *new, "train.overwrite=true"))
    pretrain_cls.main(run_args(tiny_cls_set, fresh, *new))
    # the same files as the same run into an empty folder: no old checkpoint, eval_only/ ...
    assert sorted(snapshot(out)) == sorted(snapshot(fresh))
    assert "model_0000000.pth" not in snapshot(out)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert train_iterations(out) == [1]
    assert (out / "log.txt").read_text().count("records in") == 1    # not appended to


def test_eval_only_runs_write_their_own_sub_folders(tiny_cls_set, finished_cls_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_cls_run, out)
    before = snapshot(out)
    weights = ["--eval-only", "--weights", str(out / "model_final.pth")]
    first = pretrain_cls.main(run_args(tiny_cls_set, out, *weights))
    second = pretrain_cls.main(run_args(tiny_cls_set, out, *weights))
    assert snapshot(out, skip=("eval_only",)) == before
    folders = sorted((out / "eval_only").iterdir())
    assert len(folders) == 2                        # unique names (-2 within one second)
    for folder, result in zip(folders, (first, second)):
        metrics = json.loads((folder / "eval" / "metrics.json").read_text())
        assert metrics["top1_err"] == pytest.approx(result["top1_err"])
        assert {"env.json", "log.txt", "config.yaml"} <= {p.name for p in folder.iterdir()}
        assert str(folder) in (folder / "log.txt").read_text()      # says where it wrote
    assert snapshot(folders[0]) != snapshot(folders[1])     # two runs, two logs


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tiny_cls_set, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (out / LOCK_FILE).write_text(f"{other.pid} {socket.gethostname()}\n")
        with pytest.raises(ConfigError, match=f"in use by process {other.pid}") as e:
            pretrain_cls.main(run_args(tiny_cls_set, out))
        assert str(out) in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]   # nothing written
    finally:
        other.kill()
        other.wait()
    pretrain_cls.main(run_args(tiny_cls_set, out))                  # its process is gone: stale
    assert train_iterations(out) == [1, 2]
    assert not (out / LOCK_FILE).exists()
