"""What every training tool does the same way: its command line, seeding, and the run's setup
(device, torchrun, logger, resolved config and environment recorded)."""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from detres.config import ConfigError, dump  # noqa: E402
from detres.data.io import DatasetError  # noqa: E402
from detres.engine import distributed as du  # noqa: E402
from detres.engine.checkpoint import CheckpointError  # noqa: E402
from detres.engine.logging import setup_logger, write_env  # noqa: E402
from detres.engine.loop import NonFiniteLossError  # noqa: E402
from detres.models.weights import WeightsMismatchError  # noqa: E402

# What a user can cause and fix: shown as one "error: ..." line, never a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError,
               WeightsMismatchError, NonFiniteLossError)


def parse_tool_args(doc: str, default_config: str, example: str,
                    argv: list[str] | None = None) -> argparse.Namespace:
    """``[CONFIG] [key=value ...] [--resume] [--eval-only --weights W]`` (DESIGN.md section 4)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=example,
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


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_run(cfg: Any, write_config: bool
              ) -> tuple[torch.device, du.DistInfo, Path, logging.Logger]:
    """Device, distributed state and logger from ``cfg.train``; the main rank writes
    config.yaml (unless only evaluating) and env.json into ``train.output_dir``."""
    device = du.resolve_device(cfg.train.device)
    dist = du.init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    output_dir = Path(cfg.train.output_dir)
    logger = setup_logger(output_dir, dist.rank)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if write_config:
            dump(cfg, output_dir / "config.yaml")
        env = write_env(output_dir)
        logger.info(f"git {env['git_revision']}, torch {env['torch']}, {env['cpu_count']} CPUs, "
                    f"GPUs {env['gpus'] or 'none'}, device {device}, world size {dist.world_size}")
    seed_all(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.use_deterministic_algorithms(cfg.train.deterministic)
    return device, dist, output_dir, logger


def run_main(main: Callable[[], Any], extra_errors: tuple[type[Exception], ...] = ()) -> None:
    """Runs a tool's ``main``: user errors (and ``extra_errors``) exit 1 with one line;
    torchrun state is torn down."""
    try:
        main()
    except (*USER_ERRORS, *extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        du.cleanup()
