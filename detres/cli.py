"""What every tool does the same way: its command line and how user errors end it. The tools
in ``tools/`` are thin entry points over this module and the tasks' ``train`` / ``evaluate``
(``detres/tasks``), which set their run up with ``detres.engine.launch.setup_run``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from detres.config import ConfigError, load_config
from detres.data.io import DatasetError
from detres.engine import distributed as du
from detres.engine.checkpoint import CheckpointError
from detres.engine.loop import NonFiniteLossError
from detres.models.weights import UnreadableWeightsError, WeightsMismatchError

# What a user can cause and fix: shown as one "error: ..." line, never a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError,
               WeightsMismatchError, UnreadableWeightsError, NonFiniteLossError)


def parse_tool_args(doc: str, default_config: str,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """``[CONFIG] [key=value ...] [--resume] [--eval-only --weights W]`` (the command-line
    contract of docs/architecture.md)."""
    parser = argparse.ArgumentParser(description=doc,   # the tool's docstring, examples included
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. solver.base_lr=0.01 train.max_iter=100")
    parser.add_argument("--resume", action="store_true",
                        help="continue from train.output_dir/last_checkpoint")
    parser.add_argument("--eval-only", action="store_true",
                        help="only evaluate --weights on data.val")
    parser.add_argument("--weights", default=None,
                        help="checkpoint to evaluate (model_final.pth of a run of this tool)")
    args = parser.parse_intermixed_args(argv)  # options may stand between key=value items
    if args.config is not None and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    if args.eval_only and not args.weights:
        parser.error("--eval-only needs --weights W")
    return args


OOM_HINT = ("lower solver.ims_per_batch (training), test.ims_per_batch (evaluation) or the "
            "image size (data.min_size_train, data.max_size_train, data.min_size_test, "
            "data.max_size_test); the last checkpoint in train.output_dir is intact and "
            "--resume continues from it")


def run_main(main: Callable[[], Any], extra_errors: tuple[type[Exception], ...] = ()) -> None:
    """Runs a tool's ``main``: user errors (and ``extra_errors``) and running out of memory
    exit 1 with one line; torchrun state is torn down."""
    try:
        main()
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:    # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        print(f"error: out of {where} memory; {OOM_HINT}", file=sys.stderr)
        sys.exit(1)
    finally:
        du.cleanup()


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or PyTorch's CPU allocator failing
    (a RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or "can't allocate memory" in str(error))


def user_message(error: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back wrapped
    ("Caught ImageDecodeError in DataLoader worker process 0. Original Traceback ..."); its
    message is the last line of that traceback, so the user reads the same line whether the
    loader has workers or not."""
    text = str(error)
    if "in DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]           # "pkg.module.ImageDecodeError: <message>"
    name = f"{type(error).__name__}: "
    return last.split(name, 1)[1] if name in last else last


# The default configs of the training tools: the checkout's configs/ folder.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def task_tool_main(argv: list[str] | None = None, *, doc: str, task: ModuleType,
                   default_config: Path, stored_config: bool = False) -> dict:
    """The whole ``main`` of a training tool: ``[CONFIG] [key=value ...] [--resume]
    [--eval-only --weights W]`` -> ``task.train(cfg, resume=...)`` or ``task.evaluate(cfg,
    W)``, ``cfg`` being a ``task.Config`` read from CONFIG (default ``default_config``).

    With ``stored_config`` and no CONFIG, ``--eval-only`` takes the config stored in the
    checkpoint: ``task.evaluate(None, W, overrides)``.
    """
    args = parse_tool_args(doc, f"configs/{default_config.name}", argv)
    if args.eval_only and args.config is None and stored_config:
        return task.evaluate(None, args.weights, args.overrides)
    cfg = load_config(args.config or default_config, args.overrides, schema=task.Config)
    if args.eval_only:
        return task.evaluate(cfg, args.weights)
    return task.train(cfg, resume=args.resume)
