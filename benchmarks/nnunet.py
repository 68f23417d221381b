"""nnU-Net v2: nnU-Net's own predictor vs medcam on the same model folder and case, in one run.

    python benchmarks/nnunet.py --build /tmp/nnunet_bench     # builds the phantom model folder first (4 mm, 32^3)
    python benchmarks/nnunet.py --folder MODEL_FOLDER --files c_0000.nii.gz ... [--label c.nii.gz] [--folds 0]

For mirroring off and on (a model loaded for each), the seconds of

* ``inference``: ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (tiles, Gaussian, mirroring, folds);
* per method (``--methods``, default hirescam and gradcam) and 1 and 3 targets:
  - ``given``: ``medcam.frameworks.nnunet.explain`` with nnU-Net's logits given (``logits=``, as a pipeline that
    already ran the predictor has them), targets = the predicted regions by dataset.json name (``PredictedROI``);
  - ``with_prediction``: the same targets, explain calling the predictor itself first (what ``medcam explain
    --model nnunet:...`` pays per method);
  - ``mask``: the case's reference label regions (``MaskROI``; ``--label``, the build's labelsTr): no target needs
    the prediction, so explain accumulates nnU-Net's logits in its own gradient pass (prediction included).

and the ratios medcam / inference. Timing: one warm-up call of each, then every case is called in turn,
``--repeats`` times, and the medians are compared, so a drift of a shared machine's speed hits all alike.
Preprocessing (the same for both) is not timed. Prints a table and writes the run as JSON (``--out``, default
``benchmarks/results/nnunet_<date>.json``), with the machine's load average.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset502_Phantom"
CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def build(root: Path, spacing: float, patch: int) -> None:
    """The tests' phantom model folder (tests/_nnunet_build.py), with bigger phantoms and patch."""
    if (root / "results" / DATASET / CONFIG / "fold_0").is_dir():
        return
    cmd = [sys.executable, "-m", "tests._nnunet_build", str(root), "--regions", "--spacing", str(spacing)]
    cmd += ["--patch", str(patch), str(patch), str(patch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def case_data(model, files: list[str], label: str | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """nnU-Net's preprocessing of the case (and of its label file, onto the same grid)."""
    if label is None:
        return model.preprocess(files)[0], None
    pred = model.predictor
    pre = pred.configuration_manager.preprocessor_class(verbose=False)
    data, seg, _ = pre.run_case(files, label, pred.plans_manager, pred.configuration_manager, model.dataset_json)
    return torch.from_numpy(np.ascontiguousarray(data)).float(), seg[0]


def mask_targets(model, seg: np.ndarray, names: list[str]) -> list:
    """One ``MaskROI`` per output name: the reference label's voxels of that label or region (dataset.json)."""
    from medcam.targets import MaskROI

    out = []
    for n in names:
        value = model.dataset_json["labels"][n]
        values = value if isinstance(value, list) else [value]
        out.append(MaskROI(torch.from_numpy(np.isin(seg, values)), model.channel(n)))
    return out


def cases(
    model, data: torch.Tensor, names: list[str], masks: list | None, methods: list[str], layer: str
) -> dict[str, Callable]:
    """Name -> call; ``inference`` first."""
    import medcam
    from medcam.frameworks import nnunet

    logits = model.predict_logits(data)
    calls: dict[str, Callable[[], Any]] = {"inference": lambda: model.predict_logits(data)}

    def explain(method: str, targets: list, given: torch.Tensor | None) -> Callable[[], Any]:
        # a new explainer per call, as `medcam explain` builds one per method (layer "auto" resolved each time)
        return lambda: nnunet.explain(medcam.METHODS[method](model.network, layer), model, data, targets, logits=given)

    for method in methods:
        for k in (1, 3):
            predicted = [model.target(n) for n in names[:k]]
            calls[f"{method}_{k}_given"] = explain(method, predicted, logits)
            calls[f"{method}_{k}_with_prediction"] = explain(method, predicted, None)
            if masks is not None:
                calls[f"{method}_{k}_mask"] = explain(method, masks[:k], None)
    return calls


def measure(calls: dict[str, Callable], repeats: int, cuda: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per call (interleaved repeats, after one warm-up call of inference and of one explanation)
    and each explanation's stats (of its first call)."""
    times: dict[str, list[float]] = {n: [] for n in calls}
    info: dict[str, Any] = {}
    for n in list(calls)[:2]:  # warm-up
        calls[n]()
    for _ in range(repeats):
        for n, fn in calls.items():
            t0 = time.perf_counter()
            res = fn()
            if cuda:
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
            if n != "inference" and n not in info:
                info[n] = {**res.stats, "roi_voxels": res.roi_voxels[0].tolist()}
    return {n: statistics.median(v) for n, v in times.items()}, info


def run(args: argparse.Namespace, files: list[str], label: str | None) -> list[dict[str, Any]]:
    from medcam.frameworks import nnunet

    folds = [f.strip() for f in args.folds.split(",")]
    rows = []
    for mirroring in args.mirroring:
        model = nnunet.load(args.folder, folds=folds, device=args.device, use_mirroring=mirroring)
        data, seg = case_data(model, files, label)
        names = [n for n in model.output_names if n.lower() != "background"][:3]
        masks = mask_targets(model, seg, names) if seg is not None else None
        n_tiles = len(model.predictor._internal_get_sliding_window_slicers(data.shape[1:]))
        repeats = args.repeats_mirrored if mirroring and args.repeats_mirrored else args.repeats
        calls = cases(model, data, names, masks, args.methods, args.layer)
        seconds, info = measure(calls, repeats, args.device != "cpu")
        row: dict[str, Any] = {
            "mirroring": mirroring,
            "mirror_axes": list(model.mirror_axes),
            "folds": folds,
            "data_shape": list(data.shape),
            "patch_size": list(model.patch_size),
            "tiles": n_tiles,
            "repeats": repeats,
            "targets": names,
            "seconds": seconds,
            "ratios": {n: round(s / seconds["inference"], 3) for n, s in seconds.items() if n != "inference"},
            "explain_stats": info,
        }
        print(json.dumps({k: v for k, v in row.items() if k != "explain_stats"}), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    head = f"{'mirroring':>9} {'infer s':>8} {'method':>9} {'targets':>7} {'given':>13} {'with pred.':>13} {'mask':>13}"
    lines = [head]
    for r in rows:
        s, q = r["seconds"], r["ratios"]
        for method in methods:
            for k in (1, 3):
                cells = []
                for mode in ("given", "with_prediction", "mask"):
                    n = f"{method}_{k}_{mode}"
                    cells.append(f"{s[n]:6.2f} {q[n]:5.2f}x" if n in s else f"{'-':>13}")
                lines.append(f"{str(r['mirroring']):>9} {s['inference']:8.2f} {method:>9} {k:>7} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="nnU-Net model folder")
    ap.add_argument("--files", nargs="+", help="one case, one file per channel")
    ap.add_argument("--label", help="the case's reference label file (for the mask targets)")
    ap.add_argument("--build", type=Path, help="build the phantom model folder here (once) and use it")
    ap.add_argument("--spacing", type=float, default=4.0, help="--build: phantom voxel size in mm")
    ap.add_argument("--patch", type=int, default=32, help="--build: cubic patch size")
    ap.add_argument("--folds", default="0")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["hirescam", "gradcam"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-mirrored", type=int, default=None, help="repeats with mirroring (default --repeats)")
    ap.add_argument(
        "--mirroring",
        type=lambda s: [{"off": False, "on": True}[v] for v in s.split(",")],
        default=[False, True],
        help="off,on (default both)",
    )
    ap.add_argument("--layer", default="auto", help="the hooked layer (default: auto, the bottleneck)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse, for both sides (benchmarks/cpu_memory.py)",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/nnunet_<date>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        sys.path.insert(0, str(Path(__file__).parent))
        import cpu_memory  # benchmarks/cpu_memory.py

        if not cpu_memory.keep_freed_memory():
            raise SystemExit("--keep-freed-memory: this C library does not take mallopt settings")
    label = args.label
    if args.build:
        build(args.build, args.spacing, args.patch)
        args.folder = args.build / "results" / DATASET / CONFIG
        args.files = sorted(glob.glob(str(args.build / "raw" / DATASET / "imagesTr" / "phantom_001_*")))
        label = str(args.build / "raw" / DATASET / "labelsTr" / "phantom_001.nii.gz")
    if not args.folder or not args.files:
        ap.error("give --folder and --files, or --build ROOT")

    load_before = os.getloadavg()
    rows = run(args, args.files, label)
    print(table(rows, args.methods))
    from importlib.metadata import version

    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "layer": args.layer,
        "keep_freed_memory": args.keep_freed_memory,
        "rows": rows,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"nnunet_{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
