"""nnU-Net v2 cases in, maps out: explaining cases given as files with a model from :mod:`medcam.frameworks.nnunet`.

Kept apart from :mod:`medcam.frameworks.nnunet` (the model and its exact explanation) so that the case handling can
grow (cohorts, target kinds) independently of the explanation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedcamError
from ..layers import resolve_layer
from .nnunet import NnUNetError, NnUNetModel, explain

__all__ = ["explain_files"]


def explain_files(
    model: NnUNetModel,
    files: Sequence[str | Path],
    output: str | Path,
    *,
    methods: Sequence[str] = ("hirescam",),
    targets: Sequence[str] = (),
    layer: str = "auto",
    case_id: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Explain one case given as image files (one per channel, ``dataset.json`` order) and write the results.

    Writes ``output/<case_id>/``: ``<method>_<target>.<ext>`` maps on the original image grid (the input's format
    and geometry), ``segmentation.<ext>`` (nnU-Net's prediction) and ``summary.json`` (model, folds, mirroring, tile
    step, scores, ROI sizes, map maxima). Targets are ``dataset.json`` label/region names (default: every
    foreground one); each is the region nnU-Net predicts for it. Everything is checked before the first network pass;
    an existing case folder is refused unless ``overwrite``.

    Returns:
        The summary written (a dict).
    """
    import json
    import shutil
    import tempfile

    from ..methods import METHODS

    files = [Path(f) for f in files]
    unknown = [m for m in methods if m.lower() not in METHODS]
    if unknown:
        raise MedcamError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    names = list(targets) or [n for n in model.output_names if n.lower() != "background"]
    tl = [model.target(n) for n in names]  # unknown names fail here
    if len(files) != len(model.channel_names):
        raise NnUNetError(
            f"the model takes {len(model.channel_names)} input channels {model.channel_names} (dataset.json "
            f"channel_names), got {len(files)} file(s)"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NnUNetError(f"input file '{missing[0]}' does not exist")
    ending = str(model.dataset_json.get("file_ending", ".nii.gz"))
    if not all(str(f).endswith(ending) for f in files):
        raise NnUNetError(f"the model reads '{ending}' files (dataset.json file_ending); got {[f.name for f in files]}")
    cid = case_id or files[0].name[: -len(ending)].rsplit("_", 1)[0]
    final = Path(output) / cid
    if final.exists() and not overwrite:
        raise MedcamError(f"'{final}' exists; pass overwrite=True (--overwrite) to replace it")
    if layer != "auto":
        resolve_layer(model.network, layer)

    data, props = model.preprocess(files)
    logits = model.predict_logits(data)
    Path(output).mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{cid}.", dir=output))
    try:
        seg = model.segmentation(logits, props)
        model.write_map(seg.astype(np.float32), props, stage / f"segmentation{ending}")
        results = []
        for method in methods:
            cam = METHODS[method.lower()](model.network, layer, progress=progress)
            res = explain(cam, model, data, tl, logits=logits, progress=progress)
            orig = model.to_original_grid(res.maps[0], props)
            for k, name in enumerate(names):
                fname = f"{method.lower()}_{name.replace(' ', '_')}{ending}"
                model.write_map(orig[k], props, stage / fname)
                results.append(
                    {
                        "method": method.lower(),
                        "target": name,
                        "layer": res.layer,
                        "file": fname,
                        "score": float(res.scores[0, k]),
                        "roi_voxels": int(res.roi_voxels[0, k]),
                        "map_max": float(orig[k].max()),
                        "passes": res.stats["passes"],
                    }
                )
        summary = {
            "case_id": cid,
            "inputs": [str(f.resolve()) for f in files],
            "model": model.describe(),
            "pipeline": "nnunet (nnU-Net's own preprocessing, sliding window, mirroring and export)",
            "segmentation": f"segmentation{ending}",
            "maps": results,
        }
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():
            shutil.rmtree(final)
        stage.replace(final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return summary
