#!/usr/bin/env python
"""Re-run the AME-CAM tables over several seeds: train + evaluate per seed, then one table of the seed-to-seed spread.

Each seed trains a new classifier and aggregator (same data and split; the seed changes initialisation, batch order
and the validation split). The combined table gives, per method, the mean over seeds of the per-seed mean over test
tumour slices, +- the standard deviation over seeds (ddof=1), for the authors' polarity and for the label-decided
ablation. Every extra argument is passed to amecam_train.py.

Examples:
  # CPU (2 shared cores), the settings of data_scripts/AMECAM_RESULTS.md:
  python data_scripts/amecam_rerun.py --seeds 0,1,2 --out runs/rerun_phantom_cpu -- --data phantom --quick --n-phantoms 8
  # GPU, the authors' sizes (240x240 real slices, width 64, 10 + 10 epochs, batch 64):
  python data_scripts/amecam_rerun.py --seeds 0,1,2 --out runs/rerun_real_gpu -- --data real --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import amecam_evaluate  # noqa: E402
import amecam_train  # noqa: E402

METRICS = ("dice", "iou", "hd95", "hd95_pooled")


def combine(results: list[dict], key: str) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {metric: (mean over seeds, std over seeds)}}`` of the per-seed means."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in results[0][key]:
        out[method] = {}
        for m in METRICS:
            v = np.array([r[key][method][m][0] for r in results])
            out[method][m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))
    return out


def table(rows: dict) -> list[str]:
    lines = ["| method | Dice | IoU | HD95 ours (px) | HD95 pooled, medpy (px) |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        cells = [
            f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if k in ("dice", "iou") else f"{r[k][0]:.1f} ± {r[k][1]:.1f}"
            for k in METRICS
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        own, passed = argv[:i], argv[i + 1 :]
    else:
        own, passed = argv, []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-gradcam", action="store_true")
    a = p.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.out / "slices.pt"
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        run = a.out / f"seed{seed}"
        amecam_train.main([*passed, "--seed", str(seed), "--out", str(run), "--slices-cache", str(cache)])
        ev = ["--ckpt", str(run / "amecam.pt"), "--slices-cache", str(cache)]
        amecam_evaluate.main(ev + (["--skip-gradcam"] if a.skip_gradcam else []))
        results.append(json.loads((run / "results.json").read_text()))
    auc = [v for r in results for v in r["test_auc"]]
    lines = [
        f"{results[0]['title'].split(', seed')[0]}; seeds {a.seeds}; classifier test AUC per seed and fold "
        f"{', '.join(f'{v:.3f}' for v in auc)}; {time.time() - t0:.0f} s in all",
        "",
        "Authors' polarity (mean over seeds ± std over seeds of the per-seed mean over slices):",
        "",
        *table(combine(results, "rows")),
        "",
        "Ablation, label-decided polarity:",
        "",
        *table(combine(results, "rows_label_polarity")),
    ]
    (a.out / "combined.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
