"""Starting a run: device, torchrun process group, logger, seeds, and the records every run
writes first (the resolved ``config.yaml`` and ``env.json``)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detres.config import dump
from detres.engine import distributed as du
from detres.engine.logging import setup_logger, write_env


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
