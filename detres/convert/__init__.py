"""Weight converters: other toolkits' files -> detres files, so that a model can be checked
against a published result before any training, or trained from published weights.

- ``pickles``: reads untrusted ``.pkl`` files (numpy arrays in dicts) without running code;
- ``msra``: MSRA's original ImageNet ResNets (Caffe names, as detectron2 ships ``R-101.pkl``)
  -> a backbone file (``weights.backbone_file``);
- ``detectron2``: detectron2's C4 Faster R-CNN checkpoints (``.pkl`` model zoo files and
  ``.pth``) -> a detres detection checkpoint and its config.

Both sources take BGR images in 0..255; detres takes RGB (docs/architecture.md, Carriers), so
the converters reverse conv1's input channels and the pixel mean instead of adding a config key.
:func:`convert_file` is what ``tools/convert_weights.py`` runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from detres.atomic import atomic_write_bytes
from detres.config import dump
from detres.convert.detectron2 import convert_detectron2
from detres.convert.msra import backbone_snippet, convert_msra
from detres.convert.pickles import ConversionError, UnsafePickleError, load_pickle, read_arrays
from detres.engine.checkpoint import atomic_save

__all__ = ["ConversionError", "UnsafePickleError", "convert_file", "load_pickle", "read_arrays"]
FORMATS = ("detectron2", "msra")


def convert_file(kind: str, source: str | Path, out: str | Path, *, overwrite: bool = False,
                 **options: Any) -> list[str]:
    """Converts ``source`` and writes ``out`` (a ``.pth`` file) and ``out`` with ``.yaml``: the
    detector's full config (``detectron2``) or the lines that use a backbone (``msra``).

    Args:
        kind: "detectron2" or "msra".
        source: the file to convert (``.pkl`` or a torch file).
        out: where the converted weights go.
        overwrite: replace existing outputs (refused otherwise).
        **options: the converter's keyword arguments (``convert_detectron2``, ``convert_msra``).

    Returns:
        Lines that say what was converted and written, for the console.
    """
    out = Path(out)
    if out.suffix != ".pth":
        raise ConversionError(f"--out {out}: give a .pth file name (the config goes beside it "
                              f"as {out.with_suffix('.yaml').name})")
    config_path = out.with_suffix(".yaml")
    existing = [str(p) for p in (out, config_path) if p.exists()]
    if existing and not overwrite:
        raise ConversionError(f"{' and '.join(existing)} already exist; pass --overwrite to "
                              f"replace them")
    arrays = read_arrays(source)
    if kind == "detectron2":
        options.setdefault("output_dir", f"output/{out.stem}")
        checkpoint, cfg, report = convert_detectron2(arrays, str(source), **options)
        text = (f"# {checkpoint['source']} converted by tools/convert_weights.py; weights in "
                f"{out}.\n# Evaluate:  python tools/eval_det.py {config_path} --weights {out}\n"
                f"# Fine-tune: python tools/train_det.py {config_path} model.weights={out}\n"
                + dump(cfg))
        what = "detection checkpoint"
    elif kind == "msra":
        checkpoint = convert_msra(arrays, str(source), **options)
        text = backbone_snippet(checkpoint, str(out), checkpoint["source"])
        report = [checkpoint["source"] + ": " + ", ".join(
            f"{k}={v}" for k, v in checkpoint["arch"].items()),
            f"pixel_mean (RGB) {checkpoint['pixel_mean']}, pixel_std {checkpoint['pixel_std']}"]
        what = "backbone file"
    else:
        raise ConversionError(f"unknown format {kind!r}; valid: {', '.join(FORMATS)}")
    atomic_save(checkpoint, out)
    atomic_write_bytes(config_path, lambda f: f.write(text.encode("utf-8")))
    return report + [f"wrote {out} ({what}) and {config_path}"]
