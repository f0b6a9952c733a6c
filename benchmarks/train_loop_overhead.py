#!/usr/bin/env python
"""Images/s of the engine's training loop vs a bare PyTorch loop, measured in one run.

Same model (a width-8 CIFAR ResNet-20 classifier), same optimizer (SGD, momentum, weight
decay), same in-memory batches. Rounds of K iterations alternate bare / engine / engine / bare
..., so drifting load on a shared machine hits both alike. The engine adds: the LR schedule,
the loss dict -> one packed tensor -> host copy, the NaN/Inf check, windowed metrics, a
formatted log line every 20 iterations and the progress bar. No checkpoints are written.

    python benchmarks/train_loop_overhead.py [--rounds 20] [--iters 10] [--batch 32]

Prints images/s of both and the ratio engine / bare; the overhead (1 - ratio) should be <= 5%.
Both wall-clock and process CPU time are measured. On a machine shared with other jobs the
wall-clock ratio of two *identical* loops already scatters by a few percent, while CPU time
(one intra-op thread, so all work is in this process) counts only the work each loop does:
the CPU-time ratio is the overhead figure there.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detres.engine import Trainer, WarmupMultiStepSchedule  # noqa: E402
from detres.engine.logging import collect_env, setup_logger  # noqa: E402
from detres.models.classifier import Classifier  # noqa: E402
from detres.models.resnet import ResNet  # noqa: E402


def make(seed: int = 0) -> tuple[Classifier, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Classifier(ResNet(20, stem="cifar", num_classes=10, width=8, shortcut="A"),
                       (128.0, 128.0, 128.0), (64.0, 64.0, 64.0))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def bare_steps(model, optimizer, batches, n: int) -> None:
    for _ in range(n):
        images, labels = next(batches)
        loss = model(images, labels).losses["loss_cls"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per loop")
    parser.add_argument("--iters", type=int, default=10, help="iterations per round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup_logger(None).setLevel(logging.WARNING)         # log lines are formatted, not shown
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(8)]

    bare_model, bare_opt = make()
    bare_data = itertools.cycle(data)
    engine_model, engine_opt = make()
    trainer = Trainer(engine_model, engine_opt, WarmupMultiStepSchedule(),
                      itertools.cycle(data), max_iter=0, log_period=20, progress=True,
                      task="classification")

    def run_engine(n: int) -> None:
        trainer.max_iter += n
        trainer.run()

    run_engine(3)                                         # warm-up both (allocator, oneDNN)
    bare_steps(bare_model, bare_opt, bare_data, 3)
    wall = {"bare": [], "engine": []}
    cpu = {"bare": [], "engine": []}
    for r in range(args.rounds):
        for name in (("bare", "engine") if r % 2 == 0 else ("engine", "bare")):
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "bare":
                bare_steps(bare_model, bare_opt, bare_data, args.iters)
            else:
                run_engine(args.iters)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    images = args.rounds * args.iters * args.batch
    env = collect_env()
    print(f"torch {env['torch']}, {env['cpu_count']} CPUs, {args.threads} thread(s), "
          f"batch {args.batch}, {args.rounds} x {args.iters} iterations per loop, interleaved")
    for clock, times in (("wall-clock", wall), ("CPU time", cpu)):
        bare_ips, engine_ips = images / sum(times["bare"]), images / sum(times["engine"])
        ratio = engine_ips / bare_ips
        median = statistics.median(b / e for b, e in zip(times["bare"], times["engine"]))
        print(f"{clock:>10}: bare {bare_ips:7.1f} images/s, engine {engine_ips:7.1f} images/s, "
              f"ratio engine/bare {ratio:.3f} (median of rounds {median:.3f}), "
              f"overhead {100 * (1 - ratio):+.1f}%")


if __name__ == "__main__":
    main()
