"""Cohort throughput: the local loop vs Ray with 1 and N workers on the same phantom cohort, and Ray's overhead.

    python benchmarks/cohort_scaling.py --cases 8 --workers 1,2            # CPU, this machine
    python benchmarks/cohort_scaling.py --cases 32 --workers 1,2,4 --gpu   # one worker per GPU

Every run explains the same cases with the same model and settings (``explain_cohort``; only the executor differs)
into its own output folder. Printed per run (one JSON line each, then everything as one JSON object):

* ``wall_s`` (the local run after one untimed warm-up case): from the call to the cohort summary written; for Ray it includes starting the workers (import of
  torch/MONAI, model unpickled and moved) but not ``ray.init`` (timed once, ``ray_init_s``);
* ``case_s``: the sum of the cases' own seconds (load, explain, write) as recorded in ``cohort_summary.json``;
* ``startup_s`` (Ray): time until the first worker started its first case = first record's arrival minus its own
  seconds;
* ``cases_per_min`` (wall, start-up included) and ``steady_cases_per_min`` (start-up excluded);
* ``overhead_per_case_s`` (1 worker): ``(wall - startup - case_s) / cases``: what Ray adds to each case (dispatch,
  pickling the case source and the record, ``ray.wait``) beyond the same work done in-process; and
  ``overhead_pct_of_40s_case``: that over a 40 s case, the issue's target (< 5 %).

Cases are phantoms (``medcam.data.phantoms``) explained with a small random SegResNet (init_filters 8) on the whole
image at ``--spacing`` mm, Seg-HiRes-Grad-CAM and Seg-Grad-CAM, one target; torch uses one thread in every worker
and in the local run (``--cpus-per-worker`` threads), so runs compare like with like.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model(spacing: float):
    from monai.networks.nets import SegResNet

    from medcam.pipeline import LoadedModel

    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1)).eval()
    pre = {"orientation": "RAS", "spacing": (spacing,) * 3, "normalize": True, "crop_foreground": False}
    pre["divisible_by"] = 16
    return LoadedModel(net=net, kind="factory", spec="SegResNet(init_filters=8)", regions=("TC", "WT", "ET"),
                       preprocessing=pre)  # fmt: skip


def _run(cases, model, out: Path, executor) -> dict:
    from medcam.pipeline import explain_cohort, parse_targets

    arrivals: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    run = explain_cohort(
        cases, model, ["hirescam", "gradcam"], parse_targets(["WT"], ("TC", "WT", "ET")), "down_layers.3", None,
        out, png=False, slicer=False, progress=False, executor=executor,
        on_case=lambda rec: arrivals.append((time.perf_counter() - t0, rec["seconds"])),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if run["ok"] != len(cases):
        raise SystemExit(f"benchmark run failed: {run['cases']}")
    case_s = sum(c["seconds"] for c in run["cases"])
    first_arrival, first_seconds = min(arrivals)
    startup = max(0.0, first_arrival - first_seconds)
    n = len(cases)
    return {
        "wall_s": round(wall, 2),
        "case_s": round(case_s, 2),
        "startup_s": round(startup, 2),
        "cases_per_min": round(60 * n / wall, 2),
        "steady_cases_per_min": round(60 * n / max(wall - startup, 1e-9), 2),
        "mean_case_s": round(case_s / n, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts for the Ray runs")
    ap.add_argument("--spacing", type=float, default=4.0, help="working grid (mm): smaller = longer cases")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (and the local run on cuda)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of a local instance")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    import ray

    from medcam.data.phantoms import write_phantom_case
    from medcam.pipeline import discover_cases
    from medcam.pipeline.executors import LocalExecutor
    from medcam.pipeline.ray_executor import RayExecutor

    root = Path(tempfile.mkdtemp(prefix="medcam-cohort-bench-"))
    try:
        for seed in range(args.cases):
            write_phantom_case(root / "cases", seed=seed, spacing_mm=2.0)
        cases = discover_cases([root / "cases"])
        model = _model(args.spacing)
        threads = max(1, int(args.cpus_per_worker))
        result: dict = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "cpus": __import__("os").cpu_count(),
            "cases": len(cases),
            "spacing_mm": args.spacing,
            "runs": {},
        }
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        local_ex = LocalExecutor()
        if args.gpu:
            model.net.cuda()
        _run(cases[:1], model, root / "warm-up", local_ex)  # one-off imports and allocations, not timed
        result["runs"]["local"] = _run(cases, model, root / "out-local", local_ex)
        print(json.dumps({"run": "local", **result["runs"]["local"]}), flush=True)
        torch.set_num_threads(old_threads)
        model.net.cpu()

        t0 = time.perf_counter()
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        result["ray_init_s"] = round(time.perf_counter() - t0, 2)
        for w in [int(v) for v in args.workers.split(",")]:
            ex = RayExecutor(workers=w, gpus_per_worker=1 if args.gpu else 0, cpus_per_worker=args.cpus_per_worker)
            r = _run(cases, model, root / f"out-ray{w}", ex)
            result["runs"][f"ray_{w}"] = r
            print(json.dumps({"run": f"ray_{w}", **r}), flush=True)
        ray.shutdown()

        loc, r1 = result["runs"]["local"], result["runs"].get("ray_1")
        if r1 is not None:
            per_case = (r1["wall_s"] - r1["startup_s"] - r1["case_s"]) / len(cases)
            result["ray_1_vs_local"] = {
                "overhead_per_case_s": round(per_case, 3),
                "overhead_pct_of_40s_case": round(100 * per_case / 40.0, 2),
                "case_s_ratio": round(r1["case_s"] / loc["case_s"], 3),
                "wall_ratio_without_startup": round((r1["wall_s"] - r1["startup_s"]) / loc["wall_s"], 3),
            }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
