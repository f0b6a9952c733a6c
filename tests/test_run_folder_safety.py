"""What a run may delete and overwrite in train.output_dir (docs/architecture.md, Run folder),
through tools/pretrain_cls.py on a tiny set: train.overwrite removes only what a detres run
recorded writing (never a user's file or folder, never through a symbolic link); a folder that
no run wrote, a parent of runs, the filesystem root and the home folder are refused whole; a
path through a file is one error line; --resume refuses another class list or another network
before it writes anything."""
import os
import shutil

import pytest

from helpers import load_tool, run_tool_script, short_cls_run_args as run_args

from detres.cli import run_main
from detres.config import ConfigError
from detres.engine.checkpoint import CheckpointError
from detres.engine.logging import read_metrics

pretrain_cls = load_tool("pretrain_cls")

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder):
    """Every file and link under ``folder`` -> its bytes (a link: where it points)."""
    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink()
                                         else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def users_work(folder):
    """``folder/mywork``: a user's thesis beside downloaded weights named like a checkpoint."""
    (folder / "mywork").mkdir(parents=True)
    (folder / "mywork" / "thesis.tex").write_text("\\section{Results}\n")
    (folder / "mywork" / "model_resnet50_imagenet.pth").write_bytes(b"weights of the user")
    return snapshot(folder / "mywork")


# ----------------------------------------------------------------------------- overwrite
def test_overwrite_removes_the_old_run_and_keeps_the_users_files(tiny_cls_set, finished_cls_run,
                                                                  tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_cls_run, out)
    mine = users_work(out)
    (out / "model_resnet50_imagenet.pth").write_bytes(b"downloaded")    # not a run's name
    pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=1", "train.checkpoint_period=100",
                           "train.overwrite=true"))
    assert not (out / "model_0000000.pth").exists()                     # the old run's
    assert [r["iteration"] for r in read_metrics(out) if r["phase"] == "train"] == [1]
    assert snapshot(out / "mywork") == mine
    assert (out / "model_resnet50_imagenet.pth").read_bytes() == b"downloaded"


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_a_folder_no_run_wrote_is_refused_and_left_as_it_was(tiny_cls_set, tmp_path, overwrite):
    project = tmp_path / "project"      # e.g. train.output_dir=. in a project's root
    project.mkdir()
    (project / "config.yaml").write_text("lr: 0.1\n")
    (project / "log.txt").write_text("my notes\n")
    (project / "env.json").write_text('{"python": "3.11"}\n')
    before = snapshot(project)
    with pytest.raises(ConfigError, match="holds no detres run") as e:
        pretrain_cls.main(run_args(tiny_cls_set, project, f"train.overwrite={overwrite}"))
    assert str(project) in str(e.value) and "\n" not in str(e.value)
    assert "train.overwrite" not in str(e.value)
    assert snapshot(project) == before


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_a_parent_of_runs_is_refused_without_offering_overwrite(
        tiny_cls_set, finished_cls_run, tmp_path, overwrite):
    parent = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(finished_cls_run, parent / name)
    before = snapshot(parent)
    with pytest.raises(ConfigError) as e:
        pretrain_cls.main(run_args(tiny_cls_set, parent, f"train.overwrite={overwrite}"))
    message = str(e.value)
    assert "(a, b)" in message and "train.output_dir=NEW_FOLDER" in message
    assert "overwrite" not in message and "\n" not in message
    assert snapshot(parent) == before


def test_a_link_to_a_folder_outside_is_neither_followed_nor_removed(tiny_cls_set, finished_cls_run,
                                                                   tmp_path):
    out, outside = tmp_path / "run", tmp_path / "datasets"
    shutil.copytree(finished_cls_run, out)
    outside.mkdir()                                      # looks like a run's stage
    (outside / "model_resnet50_imagenet.pth").write_bytes(b"weights of the user")
    (outside / "README.md").write_text("ImageNet and COCO\n")
    before = snapshot(outside)
    (out / "datasets").symlink_to(outside, target_is_directory=True)
    pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=1", "train.overwrite=true"))
    assert os.readlink(out / "datasets") == str(outside)
    assert snapshot(outside) == before


def test_a_link_among_the_records_refuses_the_run(tiny_cls_set, finished_cls_run, tmp_path):
    out, outside = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(finished_cls_run, out)
    users_work(outside)
    (outside / "metrics.json").write_text("{}")          # a record's name, through the link
    before_outside = snapshot(outside)
    shutil.rmtree(out / "eval")
    (out / "eval").symlink_to(outside, target_is_directory=True)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="symbolic link") as e:
        pretrain_cls.main(run_args(tiny_cls_set, out, "train.overwrite=true"))
    assert str(out / "eval") in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out) == before and snapshot(outside) == before_outside


# ----------------------------------------------------------------------------- where
def tool_error(capsys, *argv):
    """The one line that ``python tools/pretrain_cls.py ARGV`` ends with (its ``run_main``)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: pretrain_cls.main(list(argv)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    return lines[0]


def test_root_and_home_are_refused(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / "old").mkdir(parents=True)
    (home / "old" / "model_best.pth").write_bytes(b"a file of the user")
    before = snapshot(home)
    root_entries = sorted(os.listdir("/"))
    monkeypatch.setenv("HOME", str(home))
    # a dataset that is not there: a run that got past the folder would stop right after
    no_data = ["data.train.type=imagefolder", f"data.train.root={tmp_path / 'no_data'}",
               "train.device=cpu"]
    for folder, what in ((str(home), "home folder"), ("/", "filesystem root")):
        line = tool_error(capsys, f"train.output_dir={folder}", "train.overwrite=true", *no_data)
        assert line.startswith(f"error: train.output_dir: {folder} is the {what}")
    assert snapshot(home) == before
    assert sorted(os.listdir("/")) == root_entries


def test_an_output_dir_that_is_or_runs_through_a_file_is_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    expected = f"error: train.output_dir: {a_file} is a file"
    assert tool_error(capsys, f"train.output_dir={a_file}").startswith(expected)
    result = run_tool_script("pretrain_cls", f"train.output_dir={a_file / 'sub'}",
                             "train.device=cpu")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(expected)
    assert a_file.read_text() == "not a folder\n"


# ----------------------------------------------------------------------------- resume
def test_resume_on_other_classes_is_refused_naming_both(tiny_cls_set, finished_cls_run, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(finished_cls_run, out)
    for split in ("train", "val"):          # as many classes, other names
        for old, new in (("disk", "person"), ("square", "car"), ("triangle", "dog")):
            shutil.copytree(tiny_cls_set / split / old, other / split / new)
    before = snapshot(out)
    with pytest.raises(CheckpointError) as e:
        pretrain_cls.main(run_args(other, out, "train.max_iter=3", "--resume"))
    message = str(e.value)
    assert "'disk'" in message and "'car'" in message and "\n" not in message
    assert snapshot(out) == before          # config.yaml, env.json and log.txt too


def test_resume_with_another_depth_is_refused_before_writing(tiny_cls_set, finished_cls_run,
                                                             tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_cls_run, out)
    before = snapshot(out)
    with pytest.raises(CheckpointError) as e:
        pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=3", "model.backbone.depth=14",
                               "--resume"))
    assert snapshot(out) == before          # config.yaml too: still the run's depth 8
    message = str(e.value)
    assert "model.backbone.depth: 8 in the checkpoint, 14 here" in message
    assert "\n" not in message
    # with the run's own config it continues, and its log keeps the lines of the start
    pretrain_cls.main(run_args(tiny_cls_set, out, "train.max_iter=3", "--resume"))
    log = (out / "log.txt").read_text()
    assert log.count("resumed from") == 1 and log.count("resume: records in") == 1
    assert log.index("resumed from") < log.index("iter 3/3")
