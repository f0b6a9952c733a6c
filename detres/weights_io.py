"""Reading weight files: the one ``torch.load`` of detres (``weights_only=True``: no pickled
code runs, and the error never advises loading unsafely), state dicts and the checks that name
what does not fit, and ResNet weights from local state-dict files, pretraining backbone files
and torchvision's ImageNet weights (``torchvision://resnet101``, from the torch hub cache).

A backbone file records the architecture it was trained with (``backbone_file``): a choice
such as ``stride_in_1x1`` moves a stride without changing any parameter shape, so only the
record can tell that a file does not fit. torchvision's ImageNet weights imply theirs.

The bottom layer, beside ``safe_pickle.py`` (docs/architecture.md, Layers): checkpoints
(``engine/checkpoint.py``), converters and the tasks' builders read files through here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from detres.safe_pickle import torch_load_reason

TORCHVISION_SCHEME = "torchvision://"
MAX_LISTED_KEYS = 8


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is neither on disk nor obtainable from torchvision's URL."""


class UnreadableWeightsError(ValueError):
    """A weights file that torch cannot load with ``weights_only=True``: truncated, another
    format, or a pickle that would run code (refused, never executed)."""


class WeightsMismatchError(ValueError):
    """A state dict has missing, unexpected or wrongly shaped keys for the model."""


class BackboneArchError(WeightsMismatchError):
    """A backbone file was trained with another architecture than the model's (same shapes)."""


# the ResNet.arch() keys a file must agree on; keys a file does not record are not checked
ARCH_KEYS = ("depth", "stem", "residual", "shortcut", "stride_in_1x1", "width")
# torchvision's ResNets: 7x7 stem, projection shortcuts, stride in the 3x3 ("ResNet v1.5")
TORCHVISION_ARCH = {"stem": "imagenet", "residual": True, "shortcut": "B",
                    "stride_in_1x1": False, "width": 64}


def _torchvision_file(spec: str) -> str:
    """Path of "torchvision://resnet101[.IMAGENET1K_V2]" in the hub cache, downloaded if absent.

    IMAGENET1K_V1 is the default: torchvision's original recipe, close to the paper's (V2 adds
    later tricks). The hub cache is $TORCH_HOME/hub/checkpoints.
    """
    from torchvision.models import get_model_weights

    name, _, tag = spec[len(TORCHVISION_SCHEME):].partition(".")
    try:
        weights_enum = get_model_weights(name)
    except ValueError:
        raise ValueError(
            f"{spec}: torchvision has no model {name!r} (e.g. torchvision://resnet50)") from None
    tag = tag or "IMAGENET1K_V1"
    if tag not in weights_enum.__members__:
        raise ValueError(f"{spec}: torchvision {name} has no weights {tag!r}; "
                         f"valid: {', '.join(weights_enum.__members__)}")
    url = weights_enum[tag].url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        match = torch.hub.HASH_REGEX.search(os.path.basename(path))  # "resnet50-0676ba61.pth"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, match and match.group(1), progress=True)
        except Exception as e:  # offline, proxy, disk full, ...: all need the same remedy
            raise WeightsNotFoundError(
                f"{spec}: expected {path} in the torch hub cache; downloading {url} failed "
                f"({type(e).__name__}: {e}). Copy the file there (or set TORCH_HOME).") from e
    return path


def backbone_file(state_dict: dict[str, Tensor], arch: dict[str, Any]) -> dict[str, Any]:
    """What a backbone file holds: ``{"model": state dict, "arch": ResNet.arch()}``."""
    unknown = set(arch) - set(ARCH_KEYS)
    if unknown:
        raise ValueError(f"unknown backbone arch keys {sorted(unknown)}; valid: {ARCH_KEYS}")
    return {"model": state_dict, "arch": dict(arch)}


def read_torch_file(path: str | os.PathLike, what: str,
                    error: type[Exception] = UnreadableWeightsError, mmap: bool = False) -> Any:
    """The object in torch file ``path``, read on the CPU with ``weights_only=True``: tensors
    and plain Python values, no pickled code run. ``what`` names the file in the messages
    (``checkpoint``, ``weights file``, ...), which ``error`` carries: a missing file, or one that
    is truncated, of another format or holds pickled code (refused, never executed). ``mmap``
    maps the tensors instead of reading them (a look at a large file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, another format, or pickled code that must not run
        raise error(f"{path}: cannot read as a weights-only torch {what} "
                    f"({torch_load_reason(e)})") from None


def _read_weights(spec: str, obj: Any = None) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Reads a state dict and the architecture it records (None when the file has none);
    ``obj``: the file's content, where the caller has read it already.

    A file may hold a state dict or a checkpoint dict whose "model" entry is one (our
    checkpoints and backbone files, detectron2's). torchvision://resnetD implies
    ``TORCHVISION_ARCH`` with depth D.
    """
    arch = None
    if spec.startswith(TORCHVISION_SCHEME):
        path = _torchvision_file(spec)
        name = spec[len(TORCHVISION_SCHEME):].partition(".")[0]
        arch = dict(TORCHVISION_ARCH)
        if name.startswith("resnet") and name[6:].isdigit():
            arch["depth"] = int(name[6:])
    elif obj is not None or os.path.isfile(spec):
        path = spec
    else:
        raise WeightsNotFoundError(f"weights file not found: {spec}")
    if obj is None:
        obj = read_torch_file(path, "file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if isinstance(obj.get("arch"), dict):  # a backbone file (our checkpoints: a string)
            arch = obj["arch"]
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UnreadableWeightsError(f"{spec}: expected a state dict (name -> tensor) or a "
                                     f"checkpoint with one under 'model'")
    return obj, arch


def check_arch(model: nn.Module, arch: dict[str, Any] | None, spec: str) -> None:
    """Raises BackboneArchError when ``arch`` (a file's record) disagrees with the model's."""
    if arch is None or not hasattr(model, "arch"):
        return
    own = model.arch()
    wrong = [f"{k}: file {arch[k]!r}, model {own[k]!r}" for k in ARCH_KEYS
             if k in arch and k in own and arch[k] != own[k]]
    if wrong:
        raise BackboneArchError(
            f"weights {spec} were trained with another architecture ({'; '.join(wrong)}); "
            f"set model.backbone.<key> to the file's value (stride_in_1x1 moves a stride "
            f"without changing any weight shape, so loading anyway would be silently wrong)")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], spec: str = "state dict",
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raises WeightsMismatchError listing missing, unexpected and wrongly shaped keys.

    Keys starting with one of ``ignore_prefixes`` are skipped on both sides. A missing
    ``num_batches_tracked`` is not an error (files saved before PyTorch 0.4.1 lack it).
    """
    ignore = tuple(ignore_prefixes)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore)}
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    wrong = [f"{k} (file {tuple(given[k].shape)}, model {tuple(own[k].shape)})"
             for k in own if k in given and given[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return
    lines = [f"weights {spec} do not fit {type(model).__name__}({model.extra_repr()}): weights "
             f"for another depth, stem, width or shortcut option?"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if wrong:
        lines.append(f"  {len(wrong)} wrongly shaped keys: {_listed(wrong)}")
    if any(k.startswith("fc.") for k in missing + unexpected):
        lines.append("  (a backbone without fc loads a classifier with ignore_prefixes=('fc.',))")
    raise WeightsMismatchError("\n".join(lines))


def load_backbone_weights(model: nn.Module, spec: str,
                          ignore_prefixes: tuple[str, ...] = (), obj: Any = None) -> None:
    """Loads a ResNet's weights into ``model`` in place (``model.backbone.weights``,
    ``classifier.weights``), requiring an exact match except ignored keys and, when the file
    records one, the same architecture.

    Args:
        model: a ResNet (or any module whose names match the file).
        spec: a local file, or "torchvision://resnet101" (IMAGENET1K_V1) /
            "torchvision://resnet50.IMAGENET1K_V2", read from the torch hub cache and downloaded
            there only when absent.
        ignore_prefixes: keys skipped on both sides, e.g. ``("fc.",)`` for a detection backbone.
        obj: the content of the file ``spec`` names, where the caller has read it already.
    """
    state_dict, arch = _read_weights(spec, obj)
    check_arch(model, arch, spec)
    check_state_dict(model, state_dict, spec, ignore_prefixes)
    ignore = tuple(ignore_prefixes)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(ignore)},
                          strict=False)
