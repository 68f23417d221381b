#!/usr/bin/env python
"""Evaluate AME-CAM checkpoints from amecam_train.py on the held-out tumour slices.

Rows: each single exit (CAM = the exit's own map), ME-CAM (mean of the 4 exits, no attention), the attentive map
alone, AME-CAM (mean of 4 exits + attentive map), and Grad-CAM / HiResCAM / LayerCAM of the same classifier (medcam
engine, target = logit of the deepest exit, layer4). Every map is min-max normalised per slice and thresholded at 0.5.

Polarity (map or 1 - map): decided per method and fold on the TRAINING tumour slices, by the mean Dice of map > 0.5
vs (1 - map) > 0.5 against the reference masks (one bit per method; test slices never enter the decision). The
label-free test (region above the threshold vs its complement: which keeps the higher tumour logit of the deepest
exit) is recorded next to it; it proved unreliable on the real cases (masked inputs are out of distribution for the
classifier), so it does not decide.

Metrics per slice: Dice, IoU, HD95 (pixels of the evaluated grid; one side empty = slice diagonal), mean +- std over
the test tumour slices (label "tumour" = WT covers > 1% of the slice), pooled over folds.

Example:
  python data_scripts/amecam_evaluate.py --ckpt runs/amecam_phantom_quick/amecam.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import medcam
from medcam import targets
from medcam.amecam import (
    AttentionAggregator,
    ExitLogit,
    ResNet18IN,
    ame_cam_maps,
    apply_polarity,
    minmax_maps,
    per_slice_metrics,
    region_logit_polarity,
    summarise,
)
from medcam.metrics.localisation import dice_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from amecam_train import build_slices  # noqa: E402
from amecam_train import parse_args as train_args

log = logging.getLogger("amecam_evaluate")
GRAD_METHODS = {"Grad-CAM": medcam.SegGradCAM, "HiResCAM": medcam.SegHiResGradCAM, "LayerCAM": medcam.SegLayerCAM}


def all_maps(model: ResNet18IN, agg: AttentionAggregator, images: torch.Tensor, dev: torch.device) -> dict:
    """``{method: maps01 [N, 1, H, W]}`` (min-max normalised, network polarity) for every compared method."""
    r = ame_cam_maps(model, images, agg)
    out = {f"exit {i + 1}": minmax_maps(r["exits"][:, i : i + 1]) for i in range(4)}
    out["ME-CAM (mean of exits)"] = r["me_cam"]
    out["attentive map alone"] = minmax_maps(r["attentive"])
    out["AME-CAM"] = r["ame_cam"]
    head = ExitLogit(model, -1)
    for name, cls in GRAD_METHODS.items():
        cam = cls(head, layer="model.layer4")
        maps = torch.cat(
            [
                cam(images[s : s + 32].to(dev), [targets.ClassROI(0)], relu=True, upsample=True).cpu()
                for s in range(0, len(images), 32)
            ]
        )
        out[name] = minmax_maps(maps)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="folder for results.md / results.json (default: ckpt's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real-root", type=Path, default=None)
    p.add_argument("--slices-cache", type=Path, default=None, help="slices saved by amecam_train.py --slices-cache")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("medcam").setLevel(logging.WARNING)
    t0 = time.time()
    dev = torch.device(a.device)
    ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    targv = [
        "--data",
        ck["args"]["data"],
        "--size",
        str(ck["args"]["size"]),
        "--modality",
        ck["args"]["modality"],
        "--n-phantoms",
        str(ck["args"]["n_phantoms"]),
    ]
    targv += ["--real-root", str(a.real_root or ck["args"]["real_root"])]
    if a.slices_cache is not None:
        targv += ["--slices-cache", str(a.slices_cache)]
    data, names = build_slices(train_args(targv))
    per_method: dict[str, dict[str, list]] = {}
    polarity: list[dict] = []
    for k, f in enumerate(ck["folds"]):
        model = ResNet18IN(in_channels=1, width=ck["args"]["width"])
        model.load_state_dict(f["classifier"])
        model.to(dev).eval()
        agg = AttentionAggregator(**f["aggregator_config"])
        agg.load_state_dict(f["aggregator"])
        agg.to(dev).eval()
        is_tr = torch.isin(data.volume_index, torch.tensor(f["train_volumes"])) & (data.labels == 1)
        is_te = torch.isin(data.volume_index, torch.tensor(f["test_volumes"])) & (data.labels == 1)
        tr, te = data.subset(is_tr), data.subset(is_te)
        log.info("fold %d: %d train / %d test tumour slices", k, len(tr), len(te))
        tr_maps, te_maps = all_maps(model, agg, tr.images, dev), all_maps(model, agg, te.images, dev)
        score = lambda x, model=model: model(x.to(dev))[:, -1]  # noqa: E731  (deepest exit's tumour logit)
        for name in te_maps:
            vote, ev = region_logit_polarity(score, tr.images, tr_maps[name])
            d_pos = float(dice_score(tr_maps[name][:, 0] > 0.5, tr.masks, spatial_dims=2).mean())
            d_neg = float(dice_score((1 - tr_maps[name][:, 0]) > 0.5, tr.masks, spatial_dims=2).mean())
            pol = 1 if d_pos >= d_neg else -1
            polarity.append(
                {
                    "fold": k,
                    "method": name,
                    "polarity": pol,
                    "label_free_vote": vote,
                    **ev,
                    "train_dice_map": d_pos,
                    "train_dice_inverted": d_neg,
                }
            )
            pred = apply_polarity(te_maps[name], pol)[:, 0] > 0.5
            m = per_slice_metrics(pred, te.masks)
            for key, v in m.items():
                per_method.setdefault(name, {}).setdefault(key, []).extend(v.tolist())
    rows = {n: summarise({k: np.asarray(v) for k, v in d.items()}) for n, d in per_method.items()}
    n_slices = len(next(iter(per_method.values()))["dice"])
    size = ck["args"]["size"]
    title = (
        f"AME-CAM evaluation: data={ck['args']['data']} ({', '.join(names)}), modality={ck['args']['modality']}, "
        f"slices {size}x{size}, quick={ck['args']['quick']}, {len(ck['folds'])} fold(s), {n_slices} test tumour "
        f"slices; threshold 0.5 on min-max maps; HD95 in pixels of the {size}x{size} grid (one side empty = "
        f"{np.hypot(size, size):.1f})"
    )
    lines = [
        title,
        "",
        "| method | Dice | IoU | HD95 | polarity per fold (train Dice map / inverted; label-free vote) |",
        "|---|---|---|---|---|",
    ]
    for n, r in rows.items():
        pols = [p for p in polarity if p["method"] == n]
        pol_s = ", ".join(
            f"{p['polarity']:+d} ({p['train_dice_map']:.2f}/{p['train_dice_inverted']:.2f}; {p['label_free_vote']:+d})"
            for p in pols
        )
        lines.append(
            f"| {n} | {r['dice'][0]:.3f} +- {r['dice'][1]:.3f} | {r['iou'][0]:.3f} +- {r['iou'][1]:.3f} | "
            f"{r['hd95'][0]:.1f} +- {r['hd95'][1]:.1f} | {pol_s} |"
        )
    table = "\n".join(lines)
    print(table)
    out = a.out or a.ckpt.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "title": title,
                "rows": rows,
                "polarity": polarity,
                "n_test_slices": n_slices,
                "seconds": time.time() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {out / 'results.md'} and results.json in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
