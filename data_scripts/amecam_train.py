#!/usr/bin/env python
"""Train AME-CAM (Chen et al., MICCAI 2023) on 2D slices as the authors' public code does (windstormer/AME-CAM):
multi-exit ResNet-18 with InstanceNorm (no affine) trained with Adam 1e-4, weight decay 1e-5, cosine schedule and the
best-validation-AUC checkpoint; then the attention aggregator (classifier frozen) trained on ALL training slices
(tumour and normal) with the pixel-space C2AM loss, Adam 1e-4, weight decay 1e-5, cosine schedule.

Data (``--data``):
  phantom  BraTS-like phantom volumes from ``medcam.data.phantoms.generate_phantom`` (split by volume);
  real     the three BraTS-format cases in ``../shared/data/brats_real_cases`` (leave-one-case-out folds; their labels
           are algorithm outputs, used here only as reference masks for evaluation and for the >1% slice labels).
Slices: axial, the modalities of ``--modalities`` as input channels (default all four), per-volume per-channel
min-max, label = WT covers > 1% of the slice. Validation slices for the checkpoint: one training volume held out when
there are >= 3 training volumes, else ``--val-fraction`` of the training slices.

Examples:
  python data_scripts/amecam_train.py --data phantom --quick --out runs/amecam_phantom_quick    # < 2 min on CPU
  python data_scripts/amecam_train.py --data real --out runs/amecam_real --device cuda           # authors' sizes (GPU)
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
    p.add_argument(
        "--modalities",
        default="t1,t1ce,t2,flair",
        help="comma-separated input channels (default all four; the authors train one model per modality)",
    )
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
    p.add_argument("--cls-epochs", type=int, default=None, help="classifier epochs (default 3 quick / 10)")
    p.add_argument("--cls-lr", type=float, default=1e-4)
    p.add_argument("--att-epochs", type=int, default=None, help="attention epochs (default 3 quick / 10)")
    p.add_argument("--att-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=None, help="default 16 quick / 64 (authors: 256)")
    p.add_argument("--embedding", choices=("pixels", "features"), default="pixels", help="contrastive embeddings")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--slices-cache",
        type=Path,
        default=None,
        help="save (train) / reuse (evaluate) the prepared slices at this path",
    )
    p.add_argument("--pretrain-epochs", type=int, default=0, help="optional SimCLR-style encoder pre-training")
    a = p.parse_args(argv)
    q = a.quick
    a.modalities = [m.strip() for m in str(a.modalities).split(",") if m.strip()]
    bad = [m for m in a.modalities if m not in MODALITY_CHANNEL]
    if bad or not a.modalities:
        p.error(f"--modalities: unknown {bad}; choose from {sorted(MODALITY_CHANNEL)}")
    a.n_phantoms = a.n_phantoms or (5 if q else 40)
    a.size = a.size or (96 if q else (240 if a.data == "real" else 128))
    a.width = a.width or (16 if q else 64)
    a.cls_epochs = a.cls_epochs or (3 if q else 10)
    a.att_epochs = a.att_epochs or (3 if q else 10)
    a.batch_size = a.batch_size or (16 if q else 64)
    if a.folds is None:
        a.folds = "0" if (q or a.data == "phantom") else "0,1,2"
    return a


def load_volumes(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, volume [X, Y, Z], label [X, Y, Z])]`` for the chosen data source."""
    if args.data == "real":
        if not args.real_root.is_dir():
            sys.exit(f"real cases not found at {args.real_root} (pass --real-root)")
        return [(c, *load_modality_and_labels(args.real_root / c, list(args.modalities))) for c in REAL_CASES]
    from medcam.data.phantoms import generate_phantom

    out = []
    for s in range(args.n_phantoms):
        ph = generate_phantom(1000 + s, spacing_mm=2.0)
        chans = [MODALITY_CHANNEL[m] for m in args.modalities]
        out.append((f"phantom{1000 + s}", ph.image[chans], ph.label))
    return out


def build_slices(args: argparse.Namespace) -> tuple[SliceSet, list[str]]:
    """All slices (resized to ``args.size``) with ``volume_index`` into the returned name list."""
    cache = getattr(args, "slices_cache", None)
    if cache is not None and Path(cache).exists():
        c = torch.load(cache, weights_only=False)
        if c["key"] == [args.data, args.size, list(args.modalities), args.n_phantoms]:
            log.info("slices from cache %s", cache)
            return c["data"], c["names"]
    vols = load_volumes(args)
    sets = [extract_slices(v, lab, axis=-1, volume_index=i) for i, (_, v, lab) in enumerate(vols)]
    data, names = SliceSet.concat(sets).resized(args.size), [n for n, _, _ in vols]
    if cache is not None:
        torch.save(
            {"key": [args.data, args.size, list(args.modalities), args.n_phantoms], "data": data, "names": names}, cache
        )
    return data, names


def splits(args: argparse.Namespace, names: list[str]) -> list[tuple[list[int], list[int]]]:
    """``[(train volume indices, test volume indices)]`` per fold."""
    if args.data == "real":
        folds = [int(f) for f in str(args.folds).split(",")]
        return [([i for i in range(len(names)) if i != f], [f]) for f in folds]
    n_test = max(1, len(names) // 4)
    return [(list(range(len(names) - n_test)), list(range(len(names) - n_test, len(names))))]


def train_fold(args, data: SliceSet, train_vols: list[int], dev: torch.device, seed: int) -> dict:
    tr_all = data.subset(torch.isin(data.volume_index, torch.tensor(train_vols)))
    g = torch.Generator().manual_seed(seed)
    if len(train_vols) >= 3:  # hold out one training volume for the checkpoint choice
        val_vol = train_vols[int(torch.randint(len(train_vols), (1,), generator=g))]
        is_val = tr_all.volume_index == val_vol
    else:  # too few volumes: a random fraction of the training slices
        is_val = torch.rand(len(tr_all), generator=g) < args.val_fraction
    tr, va = tr_all.subset(~is_val), tr_all.subset(is_val)
    log.info(
        "train slices: %d (%d tumour), validation %d (%d tumour)",
        len(tr),
        int(tr.labels.sum()),
        len(va),
        int(va.labels.sum()),
    )
    torch.manual_seed(seed)
    model = ResNet18IN(in_channels=tr.images.shape[1], width=args.width).to(dev)
    pre = []
    if args.pretrain_epochs:
        pre = pretrain_contrastive(
            model, tr.images, epochs=args.pretrain_epochs, batch_size=args.batch_size, generator=g
        )
    t0 = time.time()
    hist: dict = {}
    cls_losses = train_classifier(
        model,
        tr.images,
        tr.labels,
        epochs=args.cls_epochs,
        batch_size=args.batch_size,
        lr=args.cls_lr,
        val_images=va.images,
        val_labels=va.labels,
        generator=g,
        history=hist,
    )
    log.info(
        "classifier: %d steps in %.1fs, loss %.3f -> %.3f, val AUC per epoch %s, kept epoch %s",
        len(cls_losses),
        time.time() - t0,
        np.mean(cls_losses[:5]),
        np.mean(cls_losses[-5:]),
        [round(v, 3) for v in hist["val_auc"]],
        hist["best_epoch"],
    )
    # attention aggregator on ALL training slices (tumour and normal), classifier frozen
    maps = torch.cat([exit_cams(model, tr.images[s : s + 64].to(dev))[0].cpu() for s in range(0, len(tr), 64)])
    agg = AttentionAggregator(n_maps=4, spatial_dims=2, hidden=32).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    att_losses = fit_attention(
        agg,
        tr.images,
        maps,
        "pixels" if args.embedding == "pixels" else model.embed,
        epochs=args.att_epochs,
        lr=args.att_lr,
        batch_size=args.batch_size,
        generator=g,
    )
    log.info(
        "attention: %d steps in %.1fs, loss %.4f -> %.4f",
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
        "val_auc": hist["val_auc"],
        "best_epoch": hist["best_epoch"],
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
                "val_auc": f["val_auc"],
                "best_epoch": f["best_epoch"],
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
