"""The three tasks of the paper, each a package with its schema (``config.py``), its build
(``build.py``, the only config -> object code of the task) and its runs (``run.py``:
``train(cfg)`` and ``evaluate(cfg, weights)``) that the tools call:

- ``classification``: ResNet pretraining on ImageNet, CIFAR-10 or built-in data (Sec 3.4, 4.2);
- ``detection``: Faster R-CNN with the C4 layout (Appendix A);
- ``localization``: the per-class RPN + R-CNN of Appendix C.

Each task package exposes ``Config`` (its schema), ``train(cfg, resume=False)`` and
``evaluate(cfg, weights)``: what ``detres.cli.task_tool_main`` calls for a tool.
``common`` holds the schema sections and builders they share.
"""
