"""nnU-Net v2: nnU-Net's own predictor vs medcam on the same model folder and case, in one run.

    python benchmarks/nnunet.py --folder MODEL_FOLDER --files c_0000.nii.gz c_0001.nii.gz ... [--folds 0]
    python benchmarks/nnunet.py --build /tmp/nnunet_bench      # builds the phantom model folder of the tests first

For mirroring on and off: the time of ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (inference: tiles,
Gaussian, mirroring, folds) and of medcam's explanation of 1 and of 3 targets (``medcam.frameworks.nnunet.explain``
including its own call of that prediction), median of ``--repeats`` runs, and the ratio medcam / inference.
Preprocessing (the same for both) is not timed. Prints one JSON line per case and a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(model, data, names, args) -> tuple[list[float], list[float], list[float]]:
    """Seconds of inference, medcam with 1 target and with 3 targets, ``args.repeats`` times each (interleaved)."""
    import medcam
    from medcam.frameworks import nnunet

    def infer():
        return model.predict_logits(data)

    def explain(k: int):
        cam = medcam.METHODS[args.method](model.network)
        return nnunet.explain(cam, model, data, [model.target(n) for n in names[:k]])

    infer()  # warm-up
    t_inf: list[float] = []
    t_1: list[float] = []
    t_3: list[float] = []
    for _ in range(args.repeats):
        for fn, dst in ((infer, t_inf), (lambda: explain(1), t_1), (lambda: explain(3), t_3)):
            t0 = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dst.append(time.perf_counter() - t0)
    return t_inf, t_1, t_3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="nnU-Net model folder")
    ap.add_argument("--files", nargs="+", help="one case, one file per channel")
    ap.add_argument("--build", type=Path, help="build the tests' phantom model folder here and use it")
    ap.add_argument("--folds", default="0")
    ap.add_argument("--method", default="gradcam")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build:
        if not (args.build / "results").is_dir():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests._nnunet_build",
                    str(args.build),
                    "--regions",
                    "--patch",
                    "12",
                    "12",
                    "12",
                ],
                cwd=ROOT,
                check=True,
            )
        args.folder = args.build / "results" / "Dataset502_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        args.files = sorted(glob.glob(str(args.build / "raw" / "Dataset502_Phantom" / "imagesTr" / "phantom_001_*")))
    if not args.folder or not args.files:
        ap.error("give --folder and --files, or --build ROOT")

    from medcam.frameworks import nnunet

    folds = [f.strip() for f in args.folds.split(",")]
    rows = []
    for mirroring in (False, True):
        model = nnunet.load(args.folder, folds=folds, device=args.device, use_mirroring=mirroring)
        data, _ = model.preprocess(args.files)
        names = [n for n in model.output_names if n.lower() != "background"][:3]

        t_inf, t_1, t_3 = measure(model, data, names, args)
        row = {
            "mirroring": mirroring,
            "mirror_axes": list(model.mirror_axes),
            "folds": folds,
            "data_shape": list(data.shape),
            "patch_size": list(model.patch_size),
            "method": args.method,
            "inference_s": statistics.median(t_inf),
            "medcam_1_target_s": statistics.median(t_1),
            "medcam_3_targets_s": statistics.median(t_3),
            "device": args.device,
            "threads": torch.get_num_threads(),
        }
        row["ratio_1_target"] = row["medcam_1_target_s"] / row["inference_s"]
        row["ratio_3_targets"] = row["medcam_3_targets_s"] / row["inference_s"]
        print(json.dumps(row))
        rows.append(row)
    print(f"{'mirroring':>9} {'inference s':>12} {'1 target s':>11} {'ratio':>6} {'3 targets s':>12} {'ratio':>6}")
    for r in rows:
        print(
            f"{str(r['mirroring']):>9} {r['inference_s']:12.2f} {r['medcam_1_target_s']:11.2f} "
            f"{r['ratio_1_target']:6.2f} {r['medcam_3_targets_s']:12.2f} {r['ratio_3_targets']:6.2f}"
        )


if __name__ == "__main__":
    main()
