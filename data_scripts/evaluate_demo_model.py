#!/usr/bin/env python
"""Evaluate the shipped demo SegResNet: Dice per region (TC, WT, ET) on held-out phantoms and on the real cases.

* Held-out phantoms: seeds 10000 .. 10000+n-1 (training used seeds 0 .. n_train-1), written as BraTS-2021 case
  folders (int16 NIfTI at 2 mm) and read back through :func:`medcam.data.load_brats_case`, i.e. the user path.
* Real cases (``../shared/data/brats_real_cases``): loaded with explicit modality -> file mappings and
  :func:`medcam.models.demo_preprocessing_kwargs` (RAS, 2 mm, z-score); the sigmoid probabilities are mapped back to
  the native 1 mm grid with MONAI ``Invertd`` (``case.invert``), thresholded at 0.5 and compared with the
  reference label maps there. Those references are OUTPUTS OF BraTS CHALLENGE ALGORITHMS (the TCGA ones a fusion of
  five), not expert ground truth. For context the script also scores each of the five individual algorithm maps
  against the fused reference (inter-algorithm spread).

Inference: MONAI sliding window, ``DEMO_ROI_SIZE`` windows, overlap 0.5, gaussian blending; no post-processing.

Usage::

    python data_scripts/evaluate_demo_model.py                    # prints markdown tables
    python data_scripts/evaluate_demo_model.py --write-card       # also replaces the results block of MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medcam.data import labels_to_regions, load_brats_case  # noqa: E402
from medcam.data.brats import infer_label_convention  # noqa: E402
from medcam.data.phantoms import write_phantom_case  # noqa: E402
from medcam.models import (  # noqa: E402
    DEMO_CHANNELS,
    DEMO_REGIONS,
    DEMO_ROI_SIZE,
    DEMO_SPACING_MM,
    demo_preprocessing_kwargs,
    load_demo_model,
)

HELDOUT_SEED0 = 10000
REAL_DIR = ROOT.parent / "shared" / "data" / "brats_real_cases"
#: case folder -> (modality -> file name), reference label file
REAL_CASES: dict[str, tuple[dict[str, str], str]] = {
    "tcga_fg_6692": ({"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "seg_fused_simple"),
    "tcga_du_7294": ({"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "seg_fused_simple"),
    "brats_glioma_case_brainlesion": ({"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "seg_brats25_2"),
}
ALGORITHMS = ("hnfnetv1-20", "isen-20", "sanet0-20", "scan-20", "yixinmpl-20")
CARD_START, CARD_END = "<!-- EVAL:START -->", "<!-- EVAL:END -->"


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = int(pred.sum()) + int(ref.sum())
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, ref).sum() / s)


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    """Sigmoid probabilities [3, X, Y, Z] for a preprocessed image [4, X, Y, Z] (sliding window)."""
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(image).float()[None]
    y = sliding_window_inference(x, DEMO_ROI_SIZE, 2, model, overlap=0.5, mode="gaussian")
    return torch.sigmoid(torch.as_tensor(y))[0].numpy()


def read_regions(path: Path) -> np.ndarray:
    """Label file -> bool [3, X, Y, Z] (TC, WT, ET) on its stored grid (convention inferred from the values)."""
    arr = np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.int16)
    return labels_to_regions(arr, infer_label_convention(np.unique(arr)))


def eval_phantoms(model: torch.nn.Module, n: int) -> list[list[float]]:
    """Dice rows [TC, WT, ET] for held-out phantoms (through the NIfTI writer and the BraTS loader)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            folder = write_phantom_case(tmp, seed=HELDOUT_SEED0 + i, spacing_mm=DEMO_SPACING_MM)
            case = load_brats_case(folder, channel_order=DEMO_CHANNELS, **demo_preprocessing_kwargs())
            prob = predict(model, case.image)
            ref = np.asarray(case.label) > 0.5
            rows.append([dice(prob[k] > 0.5, ref[k]) for k in range(3)])
    return rows


def eval_real(model: torch.nn.Module, real_dir: Path) -> list[dict]:
    """Per real case: Dice vs the reference at 1 mm, volumes, and the five algorithms' Dice vs the fused map."""
    out = []
    for name, (mods, seg) in REAL_CASES.items():
        folder = real_dir / name
        mapping = {m: folder / f"{f}.nii.gz" for m, f in mods.items()}
        case = load_brats_case(
            mapping, channel_order=DEMO_CHANNELS, load_label=False, case_id=name, **demo_preprocessing_kwargs()
        )
        prob = predict(model, case.image)
        pred = case.invert(prob) > 0.5  # back on the native 1 mm grid
        ref = read_regions(folder / f"{seg}.nii.gz")
        if pred.shape != ref.shape:
            raise RuntimeError(f"{name}: prediction {pred.shape} vs reference {ref.shape}")
        vox_ml = float(np.prod(case.original_affine[:3, :3].diagonal().__abs__())) / 1000.0
        row = {
            "case": name,
            "reference": f"{seg}.nii.gz",
            "dice": [dice(pred[k], ref[k]) for k in range(3)],
            "ref_ml": [float(ref[k].sum()) * vox_ml for k in range(3)],
            "pred_ml": [float(pred[k].sum()) * vox_ml for k in range(3)],
        }
        algs = [folder / f"seg_{a}.nii.gz" for a in ALGORITHMS]
        if all(p.is_file() for p in algs):
            spread = np.array([[dice(r[k], ref[k]) for k in range(3)] for r in map(read_regions, algs)])
            row["algorithms_vs_fused"] = spread.tolist()
        out.append(row)
    return out


def fmt(v: Sequence[float]) -> str:
    return " | ".join(f"{x:.3f}" for x in v)


def markdown(ph: list[list[float]], real: list[dict], n_ph: int, seconds: float) -> str:
    """The results block (markdown) for the model card."""
    a = np.asarray(ph)
    lines = [
        f"Produced by `python data_scripts/evaluate_demo_model.py --write-card` ({seconds:.0f} s on CPU); threshold "
        "0.5 on each sigmoid output, no post-processing.",
        "",
        f"**Held-out phantoms** (seeds {HELDOUT_SEED0}-{HELDOUT_SEED0 + n_ph - 1}, never seen in training; "
        "2 mm, through the BraTS loader):",
        "",
        "| | TC | WT | ET |",
        "|---|---|---|---|",
        f"| mean Dice (n = {n_ph}) | {fmt(a.mean(0))} |",
        f"| min Dice | {fmt(a.min(0))} |",
        "",
        "**Real cases** (`../shared/data/brats_real_cases/`, scored on the native 1 mm grid). The reference label "
        "maps are outputs of BraTS challenge segmentation algorithms (pseudo-labels, NOT expert ground truth); "
        "for the TCGA cases the reference is the fusion of five algorithms.",
        "",
        "| case | Dice TC | Dice WT | Dice ET | ref. volume TC / WT / ET (ml) | predicted TC / WT / ET (ml) |",
        "|---|---|---|---|---|---|",
    ]
    for r in real:
        lines.append(
            f"| {r['case']} | {fmt(r['dice'])} | {' / '.join(f'{v:.1f}' for v in r['ref_ml'])} | "
            f"{' / '.join(f'{v:.1f}' for v in r['pred_ml'])} |"
        )
    lines.append(f"| mean of {len(real)} | {fmt(np.mean([r['dice'] for r in real], 0))} | | |")
    spread = [r for r in real if "algorithms_vs_fused" in r]
    if spread:
        lines += [
            "",
            "For context, the inter-algorithm spread: Dice of each of the five individual BraTS algorithms "
            f"({', '.join(ALGORITHMS)}) against their fused map, min - max:",
            "",
            "| case | TC | WT | ET |",
            "|---|---|---|---|",
        ]
        for r in spread:
            s = np.asarray(r["algorithms_vs_fused"])
            lines.append(
                f"| {r['case']} | " + " | ".join(f"{s[:, k].min():.3f} - {s[:, k].max():.3f}" for k in range(3)) + " |"
            )
    return "\n".join(lines)


def write_card(block: str, card: Path) -> None:
    """Replace the text between the EVAL markers of the model card with ``block``."""
    text = card.read_text()
    i, j = text.find(CARD_START), text.find(CARD_END)
    if i < 0 or j < i:
        raise SystemExit(f"{card} has no '{CARD_START}' ... '{CARD_END}' block")
    card.write_text(text[: i + len(CARD_START)] + "\n" + block + "\n" + text[j:])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-phantoms", type=int, default=10)
    ap.add_argument("--real-dir", type=Path, default=REAL_DIR)
    ap.add_argument("--weights", type=Path, default=None, help="evaluate another state_dict instead of the shipped one")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument("--write-card", action="store_true", help="update medcam/models/MODEL_CARD.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model = load_demo_model("cpu")
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    real = eval_real(model, args.real_dir) if args.real_dir.is_dir() else []
    if not real:
        print(f"(real cases not found in {args.real_dir}; skipped)")
    ph = eval_phantoms(model, args.n_phantoms)
    block = markdown(ph, real, args.n_phantoms, time.time() - t0)
    print(block)
    if args.json:
        args.json.write_text(json.dumps({"phantoms": ph, "real": real, "regions": DEMO_REGIONS}, indent=1))
    if args.write_card:
        write_card(block, ROOT / "medcam" / "models" / "MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
