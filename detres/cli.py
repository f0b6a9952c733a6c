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

from detres.config import PRESETS, ConfigError, load_config
from detres.data.images import DatasetError
from detres.engine import distributed as du
from detres.engine.checkpoint import CheckpointError
from detres.engine.interrupt import TrainingInterrupted
from detres.engine.launch import beside_weights
from detres.engine.loop import NonFiniteLossError
from detres.weights_io import UnreadableWeightsError, WeightsMismatchError

# What a user can cause and fix: shown as one "error: ..." line, never a traceback.
# The OS errors are paths given that cannot be used (a file where a folder must be, ...).
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError,
               WeightsMismatchError, UnreadableWeightsError, NonFiniteLossError,
               FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_override(item: str) -> bool:
    """Whether a command-line item is a ``key=value`` override rather than a file or folder
    (a path may hold "=": an existing one is a path)."""
    return "=" in item and not Path(item).exists()


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that ``key=value`` overrides set."""
    return {item.partition("=")[0].strip() for item in overrides}


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's parser: its docstring's first paragraph as the description, the rest (the
    examples, shown as written) after the options."""
    summary, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


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
    if args.config is not None and is_override(args.config):  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    if args.eval_only and not args.weights:
        parser.error("--eval-only needs --weights W")
    return args


def check_output_path(path: str | Path, *, folder: bool, flag: str = "--out") -> Path:
    """``path`` as the folder (``folder``) or file a tool writes, refused before any work when
    it cannot be one: a file where a folder must be, on the way or at the end, or a folder
    where the file goes."""
    path = Path(path)
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a folder; give a file name")
    for above in ((path,) if folder else ()) + tuple(path.parents):
        if above.exists():
            if not above.is_dir():
                raise NotADirectoryError(f"{flag} {path}: {above} is a file, not a folder")
            break
    return path


def check_device(device: str, key: str = "train.device") -> None:
    """'cuda' on a machine without CUDA, refused before the run starts (and logs)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = cuda: CUDA is not available on this machine "
                          "(torch.cuda.is_available() is false); use auto or cpu")


OOM_HINT = ("lower solver.ims_per_batch (training), test.ims_per_batch (evaluation) or the "
            "image size (data.min_size_train, data.max_size_train, data.min_size_test, "
            "data.max_size_test); the last checkpoint in train.output_dir is intact and "
            "--resume continues from it")


INTERRUPTED_EXIT = 130        # the shell's code for a process ended by SIGINT


def run_main(main: Callable[[], Any], extra_errors: tuple[type[Exception], ...] = ()) -> None:
    """Runs a tool's ``main``: user errors (and ``extra_errors``) and running out of memory
    exit 1 with one line; torchrun state is torn down."""
    try:
        main()
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(1)
    except TrainingInterrupted as e:      # Ctrl-C once: the step finished and was saved
        print(e, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    except KeyboardInterrupt:             # Ctrl-C twice, or outside training
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
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


# The default configs of the training tools: the presets shipped in the package.
CONFIGS = PRESETS


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
    check_device(cfg.train.device)
    if args.eval_only:      # its records beside the checkpoint, unless told where
        cfg = beside_weights(cfg, args.weights, override_keys(args.overrides))
        return task.evaluate(cfg, args.weights)
    return task.train(cfg, resume=args.resume, typed=override_keys(args.overrides))
