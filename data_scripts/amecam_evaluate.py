#!/usr/bin/env python
"""Evaluate AME-CAM checkpoints from amecam_train.py on the held-out tumour slices, as the authors' code does.

Rows: each single exit (the exit's own map), ME-CAM (mean of the 4 raw exit maps), the final (attentive) map alone,
AME-CAM (mean of the 4 raw exit maps and the final map, the authors' returned map), and Grad-CAM / HiResCAM / LayerCAM
of the same classifier (medcam engine, target = logit of the deepest exit, layer4).

Authors' protocol (default, ``AME-CAM_inference/design_cam.py``): every map is normalised per slice with
``(m - min + 1e-5) / (max - min + 1e-5)``; the multi-exit maps (exits, ME-CAM, final map, AME-CAM) are then INVERTED
(``1 - map``, their code always does this) and thresholded at 0.5. The Grad-CAM family keeps its usual polarity.
Ablation "label-decided polarity" (not weakly supervised: it uses training pixel labels): per method and fold, the
polarity with the higher mean Dice on the training tumour slices.

Metrics per slice: Dice, IoU, HD95 (ours: larger of the two directed 95th percentiles; one side empty = slice
diagonal) and HD95 pooled (the authors' medpy convention; one side empty = 373.12866), mean +- std over the test tumour
slices, pooled over folds; the classifier's test AUC (deepest exit, all test slices).

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
    authors_minmax,
    per_slice_metrics,
    roc_auc,
    summarise,
)
from medcam.metrics.localisation import dice_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from amecam_train import build_slices  # noqa: E402
from amecam_train import parse_args as train_args

log = logging.getLogger("amecam_evaluate")
GRAD_METHODS = {"Grad-CAM": medcam.SegGradCAM, "HiResCAM": medcam.SegHiResGradCAM, "LayerCAM": medcam.SegLayerCAM}
MULTI_EXIT = ("exit 1", "exit 2", "exit 3", "exit 4", "ME-CAM (mean of exits)", "final map alone", "AME-CAM")
METRICS = ("dice", "iou", "hd95", "hd95_pooled")


def all_maps(model: ResNet18IN, agg: AttentionAggregator, images: torch.Tensor, dev: torch.device) -> dict:
    """``{method: maps [N, 1, H, W]}`` normalised per slice as the authors do, network polarity (not inverted)."""
    r = ame_cam_maps(model, images, agg)
    out = {f"exit {i + 1}": authors_minmax(r["exits"][:, i : i + 1]) for i in range(4)}
    out["ME-CAM (mean of exits)"] = authors_minmax(r["me_cam"])
    out["final map alone"] = authors_minmax(r["attentive"])
    out["AME-CAM"] = authors_minmax(r["ame_cam"])
    head = ExitLogit(model, -1)
    for name, cls in GRAD_METHODS.items():
        cam = cls(head, layer="model.layer4")
        maps = torch.cat(
            [
                cam(images[s : s + 32].to(dev), [targets.ClassROI(0)], relu=True, upsample=True).cpu()
                for s in range(0, len(images), 32)
            ]
        )
        out[name] = authors_minmax(maps)
    return out


def _table(rows: dict, extra: dict | None = None) -> list[str]:
    lines = [
        "| method | Dice | IoU | HD95 ours (px) | HD95 pooled, medpy (px) |" + (" polarity |" if extra else ""),
        "|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for n, r in rows.items():
        cells = " | ".join(
            f"{r[k][0]:.3f} +- {r[k][1]:.3f}" if k in ("dice", "iou") else f"{r[k][0]:.1f} +- {r[k][1]:.1f}"
            for k in METRICS
        )
        lines.append(f"| {n} | {cells} |" + (f" {extra[n]} |" if extra else ""))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="folder for results.md / results.json (default: ckpt's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real-root", type=Path, default=None)
    p.add_argument("--slices-cache", type=Path, default=None, help="slices saved by amecam_train.py --slices-cache")
    p.add_argument("--skip-gradcam", action="store_true", help="leave out the Grad-CAM family rows (faster)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("medcam").setLevel(logging.WARNING)
    t0 = time.time()
    dev = torch.device(a.device)
    ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    ca = ck["args"]
    targv = ["--data", ca["data"], "--size", str(ca["size"]), "--modalities", ",".join(ca["modalities"])]
    targv += ["--n-phantoms", str(ca["n_phantoms"]), "--real-root", str(a.real_root or ca["real_root"])]
    if a.slices_cache is not None:
        targv += ["--slices-cache", str(a.slices_cache)]
    data, names = build_slices(train_args(targv))
    if a.skip_gradcam:
        GRAD_METHODS.clear()
    per_method: dict[str, dict[str, list]] = {}
    per_method_lab: dict[str, dict[str, list]] = {}
    polarity: list[dict] = []
    test_auc: list[float] = []
    for k, f in enumerate(ck["folds"]):
        model = ResNet18IN(in_channels=data.images.shape[1], width=ca["width"])
        model.load_state_dict(f["classifier"])
        model.to(dev).eval()
        agg = AttentionAggregator(**f["aggregator_config"])
        agg.load_state_dict(f["aggregator"])
        agg.to(dev).eval()
        in_tr = torch.isin(data.volume_index, torch.tensor(f["train_volumes"]))
        in_te = torch.isin(data.volume_index, torch.tensor(f["test_volumes"]))
        te_all = data.subset(in_te)
        with torch.no_grad():
            s_te = torch.cat([model(te_all.images[s : s + 64].to(dev))[:, -1].cpu() for s in range(0, len(te_all), 64)])
        test_auc.append(roc_auc(s_te, te_all.labels))
        tr, te = data.subset(in_tr & (data.labels == 1)), data.subset(in_te & (data.labels == 1))
        log.info("fold %d: %d train / %d test tumour slices, test AUC %.3f", k, len(tr), len(te), test_auc[-1])
        tr_maps, te_maps = all_maps(model, agg, tr.images, dev), all_maps(model, agg, te.images, dev)
        for name in te_maps:
            authors_pol = -1 if name in MULTI_EXIT else 1
            d_pos = float(dice_score(tr_maps[name][:, 0] > 0.5, tr.masks, spatial_dims=2).mean())
            d_neg = float(dice_score((1 - tr_maps[name][:, 0]) > 0.5, tr.masks, spatial_dims=2).mean())
            lab_pol = 1 if d_pos >= d_neg else -1
            polarity.append(
                {
                    "fold": k,
                    "method": name,
                    "authors": authors_pol,
                    "label_decided": lab_pol,
                    "train_dice_map": d_pos,
                    "train_dice_inverted": d_neg,
                }
            )
            for pol, store in ((authors_pol, per_method), (lab_pol, per_method_lab)):
                pred = apply_polarity(te_maps[name], pol)[:, 0] > 0.5
                for key, v in per_slice_metrics(pred, te.masks).items():
                    store.setdefault(name, {}).setdefault(key, []).extend(v.tolist())
    rows = {n: summarise({k: np.asarray(v) for k, v in d.items()}) for n, d in per_method.items()}
    rows_lab = {n: summarise({k: np.asarray(v) for k, v in d.items()}) for n, d in per_method_lab.items()}
    n_slices = len(next(iter(per_method.values()))["dice"])
    size = ca["size"]
    title = (
        f"AME-CAM evaluation: data={ca['data']} ({', '.join(names)}), input {'+'.join(ca['modalities'])}, "
        f"slices {size}x{size}, width {ca['width']}, classifier {ca['cls_epochs']} epochs, attention "
        f"{ca['att_epochs']} epochs, batch {ca['batch_size']}, embedding {ca['embedding']}, seed {ca['seed']}, "
        f"{len(ck['folds'])} fold(s), {n_slices} test tumour slices; classifier test AUC "
        f"{', '.join(f'{v:.3f}' for v in test_auc)}"
    )
    pol_s = {n: ", ".join(f"{q['label_decided']:+d}" for q in polarity if q["method"] == n) for n in rows_lab}
    lines = [title, "", "Authors' polarity (multi-exit maps inverted, Grad-CAM family as is):", ""]
    lines += _table(rows)
    lines += ["", "Ablation, label-decided polarity (uses training pixel labels; not weakly supervised):", ""]
    lines += _table(rows_lab, pol_s)
    table = "\n".join(lines)
    print(table)
    out = a.out or a.ckpt.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "title": title,
                "args": ca,
                "rows": rows,
                "rows_label_polarity": rows_lab,
                "polarity": polarity,
                "test_auc": test_auc,
                "n_test_slices": n_slices,
                "seconds": time.time() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {out / 'results.md'} and results.json in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
