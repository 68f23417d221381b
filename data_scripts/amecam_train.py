#!/usr/bin/env python
"""Train AME-CAM (Chen et al., MICCAI 2023) on 2D slices: multi-exit ResNet-18-IN classifier, then the attention
aggregator (classifier frozen) with the contrastive foreground/background loss.

Data (``--data``):
  phantom  BraTS-like phantom volumes from ``medcam.data.phantoms.generate_phantom`` (split by volume);
  real     the three BraTS-format cases in ``../shared/data/brats_real_cases`` (leave-one-case-out folds; their labels
           are algorithm outputs, used here only as reference masks for evaluation and for the >1% slice labels).
Slices: axial, one modality (FLAIR by default), per-volume min-max, label = WT covers > 1% of the slice.

Examples:
  python data_scripts/amecam_train.py --data phantom --quick --out runs/amecam_phantom_quick    # < 2 min on CPU
  python data_scripts/amecam_train.py --data real --out runs/amecam_real --device cuda           # full (GPU)
Then evaluate with data_scripts/amecam_evaluate.py --ckpt <out>/amecam.pt.
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

from medcam.amecam import (
    AttentionAggregator,
    ResNet18IN,
    SliceSet,
    exit_cams,
    extract_slices,
    fit_attention,
    load_modality_and_labels,
    pretrain_contrastive,
    train_classifier,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "brats_real_cases"
REAL_CASES = ("tcga_fg_6692", "tcga_du_7294", "brats_glioma_case_brainlesion")
MODALITY_CHANNEL = {"t1": 0, "t1ce": 1, "t2": 2, "flair": 3}

log = logging.getLogger("amecam_train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("phantom", "real"), default="phantom")
    p.add_argument("--real-root", type=Path, default=DEFAULT_REAL)
    p.add_argument("--modality", default="flair", choices=sorted(MODALITY_CHANNEL))
    p.add_argument("--quick", action="store_true", help="tiny CPU run (< 2 min): small slices, few steps")
    p.add_argument("--out", type=Path, default=Path("runs/amecam"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-phantoms", type=int, default=None, help="phantom volumes (default 5 quick / 40 full)")
    p.add_argument(
        "--folds", default=None, help="real data: comma-separated test-case indices (default: 0 quick, all full)"
    )
    p.add_argument("--size", type=int, default=None, help="slice size (default 96 quick / 240 real / 128 phantom)")
    p.add_argument("--width", type=int, default=None, help="ResNet width (default 16 quick / 64 full)")
    p.add_argument("--cls-steps", type=int, default=None, help="classifier optimiser steps (default 50 / 1500)")
    p.add_argument("--att-epochs", type=int, default=None, help="attention epochs (default 2 / 30)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 / 32")
    p.add_argument(
        "--slices-cache",
        type=Path,
        default=None,
        help="save (train) / reuse (evaluate) the prepared slices at this path",
    )
    p.add_argument("--pretrain-epochs", type=int, default=0, help="optional contrastive encoder pre-training")
    a = p.parse_args(argv)
    q = a.quick
    a.n_phantoms = a.n_phantoms or (5 if q else 40)
    a.size = a.size or (96 if q else (240 if a.data == "real" else 128))
    a.width = a.width or (16 if q else 64)
    a.cls_steps = a.cls_steps or (50 if q else 1500)
    a.att_epochs = a.att_epochs or (2 if q else 30)
    a.batch_size = a.batch_size or (16 if q else 32)
    if a.folds is None:
        a.folds = "0" if (q or a.data == "phantom") else "0,1,2"
    return a


def load_volumes(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, volume [X, Y, Z], label [X, Y, Z])]`` for the chosen data source."""
    if args.data == "real":
        if not args.real_root.is_dir():
            sys.exit(f"real cases not found at {args.real_root} (pass --real-root)")
        return [(c, *load_modality_and_labels(args.real_root / c, args.modality)) for c in REAL_CASES]
    from medcam.data.phantoms import generate_phantom

    out = []
    for s in range(args.n_phantoms):
        ph = generate_phantom(1000 + s, spacing_mm=2.0)
        out.append((f"phantom{1000 + s}", ph.image[MODALITY_CHANNEL[args.modality]], ph.label))
    return out


def build_slices(args: argparse.Namespace) -> tuple[SliceSet, list[str]]:
    """All slices (resized to ``args.size``) with ``volume_index`` into the returned name list."""
    cache = getattr(args, "slices_cache", None)
    if cache is not None and Path(cache).exists():
        c = torch.load(cache, weights_only=False)
        if c["key"] == [args.data, args.size, args.modality, args.n_phantoms]:
            log.info("slices from cache %s", cache)
            return c["data"], c["names"]
    vols = load_volumes(args)
    sets = [extract_slices(v, lab, axis=-1, volume_index=i) for i, (_, v, lab) in enumerate(vols)]
    data, names = SliceSet.concat(sets).resized(args.size), [n for n, _, _ in vols]
    if cache is not None:
        torch.save({"key": [args.data, args.size, args.modality, args.n_phantoms], "data": data, "names": names}, cache)
    return data, names


def splits(args: argparse.Namespace, names: list[str]) -> list[tuple[list[int], list[int]]]:
    """``[(train volume indices, test volume indices)]`` per fold."""
    if args.data == "real":
        folds = [int(f) for f in str(args.folds).split(",")]
        return [([i for i in range(len(names)) if i != f], [f]) for f in folds]
    n_test = max(1, len(names) // 4)
    return [(list(range(len(names) - n_test)), list(range(len(names) - n_test, len(names))))]


def train_fold(args, data: SliceSet, train_vols: list[int], dev: torch.device, seed: int) -> dict:
    tr = data.subset(torch.isin(data.volume_index, torch.tensor(train_vols)))
    log.info("train slices: %d (%d tumour)", len(tr), int(tr.labels.sum()))
    torch.manual_seed(seed)
    model = ResNet18IN(in_channels=1, width=args.width).to(dev)
    g = torch.Generator().manual_seed(seed)
    pre = []
    if args.pretrain_epochs:
        pre = pretrain_contrastive(
            model, tr.images, epochs=args.pretrain_epochs, batch_size=args.batch_size, generator=g
        )
    t0 = time.time()
    cls_losses = train_classifier(
        model, tr.images, tr.labels, epochs=10**6, batch_size=args.batch_size, max_steps=args.cls_steps, generator=g
    )
    log.info(
        "classifier: %d steps in %.1fs, loss %.3f -> %.3f",
        len(cls_losses),
        time.time() - t0,
        np.mean(cls_losses[:5]),
        np.mean(cls_losses[-5:]),
    )
    # attention aggregator on the tumour slices, classifier frozen (eval mode, grads only to the aggregator)
    pos = tr.subset(tr.labels == 1)
    maps = torch.cat([exit_cams(model, pos.images[s : s + 64].to(dev))[0].cpu() for s in range(0, len(pos), 64)])
    agg = AttentionAggregator(n_maps=4, image_channels=1, spatial_dims=2, hidden=32).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    att_losses = fit_attention(
        agg, pos.images, maps, model.embed, epochs=args.att_epochs, lr=1e-3, batch_size=args.batch_size, generator=g
    )
    log.info(
        "attention: %d steps in %.1fs, loss %.3f -> %.3f",
        len(att_losses),
        time.time() - t0,
        np.mean(att_losses[:3]),
        np.mean(att_losses[-3:]),
    )
    return {
        "train_volumes": train_vols,
        "classifier": {k: v.cpu() for k, v in model.state_dict().items()},
        "aggregator": {k: v.cpu() for k, v in agg.state_dict().items()},
        "aggregator_config": agg.config(),
        "losses": {"pretrain": pre, "classifier": cls_losses, "attention": att_losses},
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dev = torch.device(args.device)
    t_start = time.time()
    data, names = build_slices(args)
    log.info(
        "%d slices from %d volumes (%d tumour), size %d, %.1fs",
        len(data),
        len(names),
        int(data.labels.sum()),
        args.size,
        time.time() - t_start,
    )
    folds = []
    for k, (tr, te) in enumerate(splits(args, names)):
        log.info("fold %d: train %s test %s", k, [names[i] for i in tr], [names[i] for i in te])
        f = train_fold(args, data, tr, dev, args.seed + k)
        f["test_volumes"] = te
        folds.append(f)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    torch.save({"args": cfg, "volume_names": names, "folds": folds}, args.out / "amecam.pt")
    summary = {
        "args": cfg,
        "folds": [
            {
                "train": [names[i] for i in f["train_volumes"]],
                "test": [names[i] for i in f["test_volumes"]],
                "final_classifier_loss": float(np.mean(f["losses"]["classifier"][-10:])),
                "attention_loss_first_last": [f["losses"]["attention"][0], f["losses"]["attention"][-1]],
            }
            for f in folds
        ],
        "seconds": time.time() - t_start,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out / 'amecam.pt'} in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
