"""Every tool's command line: ``--help`` works, and the training tools, run as scripts the way
a user runs them, stop on an unknown config key with one ``error:`` line naming the key (no
traceback)."""
import pytest
from helpers import ROOT, load_tool, run_tool_script

# every tool: each answers --help with its usage
TOOLS = tuple(sorted(p.stem for p in (ROOT / "tools").glob("*.py")))
TRAINING_TOOLS = ("train_det", "pretrain_cls", "train_loc")


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    # what --help shows of the docstring: an example continued with "\" stays as written
    source = (ROOT / "tools" / f"{tool}.py").read_text().split('"""')[1].splitlines()
    for line in source:
        if line.endswith("\\"):
            assert line.replace("\\\\", "\\") in load_tool(tool).__doc__, line
    if tool in TRAINING_TOOLS:
        assert all(option in out for option in ("--resume", "--eval-only", "key=value"))


@pytest.mark.parametrize("tool,key", [("train_det", "model.rpn.proposal_test"),
                                      ("pretrain_cls", "solver.base_rl"),
                                      ("train_loc", "rpn.anchor_per_image")])
def test_training_script_names_an_unknown_key(tool, key, tmp_path):
    res = run_tool_script(tool, f"{key}=4", f"train.output_dir={tmp_path}")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: <command line>: unknown key '{key}'")
    assert "Traceback" not in res.stderr
