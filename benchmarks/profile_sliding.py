"""Where the time of a sliding-window explanation goes (a diagnostic, not a claim: claims are in sliding_window.py).

Profiles one benchmark case with ``torch.profiler`` (top kernels of inference and of medcam) and times the pieces of
one window batch by hand: forward with the graph, one backward per target, the map/stitching work.

    python benchmarks/profile_sliding.py --case brats_sw4_sphere3 --amp
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sliding_window import CASES, setup
from torch.profiler import ProfilerActivity, profile


def timed(fn, device, repeats=3):
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2], r


def top_kernels(fn, device, n):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--case", default="brats_sw4_sphere3")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--channels-last", action="store_true", help="model and volume in channels_last_3d")
    ap.add_argument("--kernels", type=int, default=25, help="rows of the kernel tables (0: no profiler tables)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    case = next(c for cs in CASES.values() for c in cs if c.name == args.case)
    infer, explain, cam, tl, _ = setup(case, device, args.amp, "hirescam", channels_last=args.channels_last)
    model, runner = cam.model, cam.runner
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    infer(), explain()
    t_inf, _ = timed(infer, device)
    t_cam, _ = timed(explain, device)

    # the pieces of one batch of windows
    xw = torch.randn((case.sw_batch, case.shape[0], *case.roi), device=device)
    if args.channels_last:
        xw = xw.contiguous(memory_format=torch.channels_last_3d)
    go = [torch.randn((case.sw_batch, case.out_channels, *case.roi), device=device) for _ in tl]
    pieces = {}
    with runner.session("grad") as hook:
        t_fwd_graph, (y, a) = timed(lambda: runner.forward(xw, hook), device)

        def backward_all():
            y, a = runner.forward(xw, hook)
            return runner.activation_grads(y, a, go)

        t_fwd_bwd, g = timed(backward_all, device)
        af = a.detach().float()
        t_map, _ = timed(lambda: [cam.upsampler(cam.formula.map(af, gk)[:, None], case.roi) for gk in g], device)
    hook_free = lambda: model(xw)  # noqa: E731

    def fwd_nograd():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            return hook_free()

    t_fwd, _ = timed(fwd_nograd, device)
    pieces = {
        "forward_no_grad_s": t_fwd,
        "forward_with_graph_s": t_fwd_graph,
        "backward_per_target_s": (t_fwd_bwd - t_fwd_graph) / len(tl),
        "maps_all_targets_s": t_map,
    }
    n_batches = -(-18 // case.sw_batch) if case.name.startswith("brats") else None
    print(
        json.dumps(
            {
                "case": case.name,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "cudnn_benchmark": args.cudnn_benchmark,
                "channels_last": args.channels_last,
                "inference_s": round(t_inf, 4),
                "medcam_s": round(t_cam, 4),
                "ratio": round(t_cam / t_inf, 3),
                "batches": n_batches,
                **{k: round(v, 5) for k, v in pieces.items()},
            }
        ),
        flush=True,
    )
    if args.kernels:
        print("== inference ==")
        print(top_kernels(infer, device, args.kernels))
        print("== medcam ==")
        print(top_kernels(explain, device, args.kernels))


if __name__ == "__main__":
    main()
