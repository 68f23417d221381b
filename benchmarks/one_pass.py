"""Predicted-region explanations in one pass (issue 27) against the given-logits case, measured in one run.

Three parts, each printed and saved as one JSON object (``--out``):

* ``sliding``: MONAI sliding window (SegResNet): ``sliding_window_inference`` alone, medcam with predicted-region
  targets and no output given (the prediction blended from medcam's own pass), and medcam with the output given
  (the given-logits case), for 1 and 3 targets, interleaved; plus the one-pass run under a small graph budget.
  Ratios: one-pass / given-logits and both / inference. Peak memory: the kept graphs' peak against the budget
  (``stats["graph_peak_bytes"]``, ``stats["graph_budget"]``).
* ``nnunet``: the same on an nnU-Net v2 model folder with mirroring (e.g. the test phantom built by
  ``python -m tests._nnunet_build ROOT --regions --patch 12 12 12``), against ``predict_logits`` and the
  ``logits=`` case.
* ``e2e``: ``medcam explain CASE`` (demo model: prediction + maps + files) with the code of ``--before`` and of
  ``--after`` (two checkouts), interleaved, wall seconds per run.

    python benchmarks/one_pass.py --parts sliding,nnunet,e2e --nnunet-folder F --nnunet-files A B C D \
        --case /work/shared/data/brats_real_cases/tcga_fg_6692 --before /work/main --after . --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import medcam
from medcam import targets as T

PEAKS: dict[str, int] = {}  # CUDA: the largest max_memory_allocated of each call


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each call, run in turns (``repeats`` rounds, after one warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    last: dict[str, Any] = {}
    for r in range(repeats + 1):
        for k, fn in calls.items():
            s, last[k] = timed(fn)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                PEAKS[k] = max(PEAKS.get(k, 0), torch.cuda.max_memory_allocated())
            if r:
                times[k].append(s)
    return {k: statistics.median(v) for k, v in times.items()}, last


def _graph_stats(res: Any) -> dict[str, Any]:
    return {k: res.stats.get(k) for k in ("prediction", "graph_budget", "graph_peak_bytes", "graph_calls_recomputed")}


def sliding(args: argparse.Namespace) -> dict[str, Any]:
    from monai.inferers import SlidingWindowInferer, sliding_window_inference
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    dev = torch.device(args.device)
    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=args.init_filters).eval().to(dev)
    x = torch.randn(1, 4, *args.volume, device=dev)
    inf = SlidingWindowInferer(roi_size=args.roi, sw_batch_size=args.sw_batch, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        y = sliding_window_inference(x, args.roi, args.sw_batch, net, overlap=0.25, mode="gaussian")
    rows: dict[str, Any] = {}
    for n in (1, 3):
        tl = [T.PredictedROI(c) for c in range(n)]
        cam = medcam.METHODS[args.method](net, layer=args.layer, inferer=inf)
        small = medcam.METHODS[args.method](net, layer=args.layer, inferer=inf, graph_budget=args.small_budget)

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return sliding_window_inference(x, args.roi, args.sw_batch, net, overlap=0.25, mode="gaussian")

        calls = {
            "inference": infer,
            "one_pass": functools.partial(cam.explain, x, tl),
            "given_logits": functools.partial(cam.explain, x, tl, output=y),
            "one_pass_small_budget": functools.partial(small.explain, x, tl),
        }
        sec, last = interleaved(calls, args.repeats)
        assert torch.equal(last["one_pass"].output, y)
        rows[f"targets_{n}"] = {
            **_ratios(sec, last),
            "windows": last["one_pass"].stats["windows"],
            "cuda_peak_bytes": dict(PEAKS),
        }
        PEAKS.clear()
        print(json.dumps({f"sliding targets={n}": rows[f"targets_{n}"]}), flush=True)
    return {"volume": list(x.shape), "roi": list(args.roi), "sw_batch": args.sw_batch, "method": args.method, **rows}


def _ratios(sec: dict[str, float], last: dict[str, Any]) -> dict[str, Any]:
    """The times of one row, their ratios and the kept-graph statistics (both parts' rows)."""
    return {
        "seconds": sec,
        "one_pass_over_given": sec["one_pass"] / sec["given_logits"],
        "one_pass_over_inference": sec["one_pass"] / sec["inference"],
        "given_over_inference": sec["given_logits"] / sec["inference"],
        "small_budget_over_given": sec["one_pass_small_budget"] / sec["given_logits"],
        "graphs": _graph_stats(last["one_pass"]),
        "graphs_small_budget": _graph_stats(last["one_pass_small_budget"]),
    }


def nnunet_part(args: argparse.Namespace) -> dict[str, Any]:
    from medcam.frameworks import nnunet

    model = nnunet.load(args.nnunet_folder, folds=tuple(args.nnunet_folds.split(",")))
    data, _ = model.preprocess(args.nnunet_files)
    if args.nnunet_crop:  # a corner of the case (the test phantom's full case is slow on a small CPU box)
        data = data[(slice(None), *(slice(0, n) for n in args.nnunet_crop))].contiguous()
    logits = model.predict_logits(data)
    names = model.output_names
    rows: dict[str, Any] = {}
    for n in (1, 3):
        tl = [model.target(names[c]) for c in range(min(n, len(names)))]
        cam = medcam.METHODS[args.method](model.network, args.nnunet_layer)
        small = medcam.METHODS[args.method](model.network, args.nnunet_layer, graph_budget=args.small_budget)
        calls = {
            "inference": lambda: model.predict_logits(data),
            "one_pass": functools.partial(nnunet.explain, cam, model, data, tl),
            "given_logits": functools.partial(nnunet.explain, cam, model, data, tl, logits=logits),
            "one_pass_small_budget": functools.partial(nnunet.explain, small, model, data, tl),
        }
        sec, last = interleaved(calls, args.repeats)
        assert torch.equal(last["one_pass"].output[0], logits)
        rows[f"targets_{n}"] = {
            **_ratios(sec, last),
            "passes": last["one_pass"].stats["passes"],
            "tiles": last["one_pass"].stats["windows"],
            "mirrors": last["one_pass"].stats["mirrors"],
            "folds": last["one_pass"].stats["folds"],
        }
        print(json.dumps({f"nnunet targets={n}": rows[f"targets_{n}"]}), flush=True)
    return {"data": list(data.shape), "patch": list(model.patch_size), "method": args.method, **rows}


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    """``medcam explain CASE`` with each checkout's code (PYTHONPATH), in turns; wall seconds and its timings."""
    out: dict[str, list[Any]] = {"before": [], "after": []}
    code = "from medcam.cli import main; main()"
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.e2e_repeats):
            for which, root in (("before", args.before), ("after", args.after)):
                dest = Path(tmp) / which
                cmd = [sys.executable, "-c", code, "explain", args.case, "-o", str(dest), "--overwrite", "-q"]
                cmd += ["--device", args.device, "--no-slicer", *args.e2e_args]
                root = str(Path(root).resolve())
                env = {**os.environ, "PYTHONPATH": root}
                # run in the checkout: ``python -c`` puts the working directory before PYTHONPATH on sys.path
                run = functools.partial(subprocess.run, cmd, env=env, cwd=root, capture_output=True, text=True)
                s, proc = timed(run)
                if proc.returncode:
                    raise SystemExit(f"{which}: {proc.stderr[-2000:]}")
                summary = json.loads(next(dest.glob("*/summary.json")).read_text())
                out[which].append({"wall_s": s, "timings": summary.get("timings"), "code": root})
                print(json.dumps({f"e2e {which} run {r}": out[which][-1]}), flush=True)
    med = {k: statistics.median(v["wall_s"] for v in runs) for k, runs in out.items()}
    return {
        "case": args.case,
        "args": args.e2e_args,
        "runs": out,
        "median_wall_s": med,
        "after_over_before": med["after"] / med["before"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sliding", help="comma-separated: sliding, nnunet, e2e")
    ap.add_argument("--device", default="cpu", help="sliding and e2e parts (nnU-Net: the model folder's load)")
    ap.add_argument("--method", default="hirescam", choices=sorted(medcam.METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-budget", type=int, default=64 << 20, help="bytes for the small-budget run")
    ap.add_argument("--volume", type=int, nargs=3, default=[112, 112, 80])
    ap.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--sw-batch", type=int, default=2)
    ap.add_argument("--init-filters", type=int, default=8)
    ap.add_argument("--layer", default="down_layers.3")
    ap.add_argument("--nnunet-folder")
    ap.add_argument("--nnunet-files", nargs="+")
    ap.add_argument("--nnunet-folds", default="0,1")
    ap.add_argument("--nnunet-layer", default="encoder.stages.2")
    ap.add_argument("--nnunet-crop", type=int, nargs=3, default=None, help="explain this corner of the case")
    ap.add_argument("--case", help="e2e: a BraTS case folder")
    ap.add_argument("--before", help="e2e: checkout of the code before (e.g. /work/main)")
    ap.add_argument("--after", default=".", help="e2e: checkout of the code after")
    ap.add_argument("--e2e-repeats", type=int, default=2)
    ap.add_argument("--e2e-args", nargs="*", default=[], help="e2e: more `medcam explain` options")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
    }
    parts = {"sliding": sliding, "nnunet": nnunet_part, "e2e": e2e}
    for part in args.parts.split(","):
        result[part] = parts[part](args)
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
