"""Cost of sliding-window explanation against plain MONAI inference, measured in the same run.

For each case it times MONAI ``sliding_window_inference`` (no grad) and medcam on the same model, volume and window
settings, and prints one JSON object: seconds, peak memory (CUDA max allocated on GPU; on CPU the peak RSS growth of
one call in a fresh process) and the ratios medcam / inference.

    python benchmarks/sliding_window.py --device cuda --amp            # GPU cases (SegResNet on BraTS size, CT)
    python benchmarks/sliding_window.py --device cpu --cases cpu_small # the reduced CPU case

Targets: spheres standing in for tumour regions (``MaskROI``: no prediction pass needed), nested like BraTS
WT > TC > ET; ``ClassROI`` (every voxel: no window can be skipped, the worst case); and ``PredictedROI`` both with
the prediction pass and with ``output=`` given (the prediction a pipeline already has from its inference run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import cpu_memory  # benchmarks/cpu_memory.py, beside this script
import psutil
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T


@dataclass
class Case:
    name: str
    shape: tuple  # (C, X, Y, Z)
    roi: tuple
    sw_batch: int
    targets: str  # "sphere1", "sphere3", "class1", "pred1", "pred1_given", "pred3_given", "small_sphere", "box16"
    out_channels: int = 3
    overlap: float = 0.5


CASES = {
    "brats": [
        Case("brats_sw1_sphere1", (4, 240, 240, 155), (128, 128, 128), 1, "sphere1"),
        Case("brats_sw1_sphere3", (4, 240, 240, 155), (128, 128, 128), 1, "sphere3"),
        Case("brats_sw4_sphere1", (4, 240, 240, 155), (128, 128, 128), 4, "sphere1"),
        Case("brats_sw4_sphere3", (4, 240, 240, 155), (128, 128, 128), 4, "sphere3"),
        Case("brats_sw1_class1", (4, 240, 240, 155), (128, 128, 128), 1, "class1"),
        Case("brats_sw1_class3", (4, 240, 240, 155), (128, 128, 128), 1, "class3"),
        Case("brats_sw1_pred1", (4, 240, 240, 155), (128, 128, 128), 1, "pred1"),
        Case("brats_sw1_pred1_given", (4, 240, 240, 155), (128, 128, 128), 1, "pred1_given"),
        Case("brats_sw1_pred3_given", (4, 240, 240, 155), (128, 128, 128), 1, "pred3_given"),
    ],
    "ct": [Case("ct_512x512x320_r20", (1, 512, 512, 320), (128, 128, 128), 1, "small_sphere", out_channels=2)],
    # issue 30: a 16^3 box in a 512x512x300 CT volume, 96^3 windows (2 of 196 windows run): memory must be that of
    # windows, not volumes (target: below inference's own peak). CPU, --memory-only (inference runs all 196 windows)
    "large_box": [Case("cpu_1x512x512x300_box16", (1, 512, 512, 300), (96, 96, 96), 1, "box16", 3, 0.25)],
    "cpu_small": [
        Case("cpu_4x128x128x96_sphere1", (4, 128, 128, 96), (64, 64, 64), 1, "sphere1"),
        Case("cpu_4x128x128x96_sphere3", (4, 128, 128, 96), (64, 64, 64), 1, "sphere3"),
        Case("cpu_4x128x128x96_class1", (4, 128, 128, 96), (64, 64, 64), 1, "class1"),
    ],
}


def sphere(shape, centre, radius, device):
    grids = torch.meshgrid(*[torch.arange(s, device=device, dtype=torch.float32) for s in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return d2 <= radius**2


def make_targets(case: Case, device):
    spatial = case.shape[1:]
    centre = [0.55 * s for s in spatial]  # off-centre, like a lesion in one hemisphere
    if case.targets == "box16":  # inside the overlap of two neighbouring windows along the last axis
        start = (200, 200, 60)
        return [T.BoxROI(1, start, [a + 16 for a in start])], False
    if case.targets == "small_sphere":
        return [T.MaskROI(sphere(spatial, [0.3 * s for s in spatial], 20, device), 1)], False
    if case.targets.startswith("sphere"):
        radii = [30, 18, 10][: int(case.targets[-1])]  # WT, TC, ET-like
        return [T.MaskROI(sphere(spatial, centre, r, device), k) for k, r in enumerate(radii)], False
    k = int(case.targets[len("class") :][:1] if case.targets.startswith("class") else case.targets[4])
    if case.targets.startswith("class"):
        return [T.ClassROI(c) for c in range(k)], False
    return [T.PredictedROI(c) for c in range(k)], case.targets.endswith("given")


class PeakRSS:
    """Peak resident memory growth of this process during a block (sampled every 5 ms)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.value = self.peak - self.base


def measure(fn, device, repeats):
    """Median seconds over ``repeats`` calls and, on CUDA, the peak allocated bytes above the baseline."""
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(peaks, default=0)


def measure_alternately(infer, explain, device, repeats):
    """``measure`` of both callables, called in turn (infer, explain, infer, ...): a drift in the speed of a shared
    machine during the run then hits both sides alike instead of only the later one."""
    t_inf, t_cam, m_inf, m_cam = [], [], 0, 0
    for _ in range(repeats):
        t, m = measure(infer, device, 1)
        t_inf.append(t)
        m_inf = max(m_inf, m)
        t, m = measure(explain, device, 1)
        t_cam.append(t)
        m_cam = max(m_cam, m)
    return statistics.median(t_inf), m_inf, statistics.median(t_cam), m_cam


def cpu_peak_rss(case: Case, amp: bool, method: str, which: str, channels_last: bool) -> int:
    """Peak RSS growth (bytes) of ONE call of ``which`` ("infer" or "explain") in a fresh process.

    In a long-lived process the allocator keeps freed pages, so RSS growth after a warm-up says little; a fresh
    process per measurement, with the model, volume and targets built before the baseline, does not have that bias.
    ``MALLOC_MMAP_THRESHOLD_`` makes glibc map every block over 64 KiB on its own and unmap it when freed, so RSS
    follows the live tensors (repeated probes agree to the byte).
    """
    cmd = [sys.executable, __file__, "--device", "cpu", "--method", method, "--probe-memory", f"{case.name}:{which}"]
    cmd += ["--amp"] * amp + ["--channels-last"] * channels_last
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def setup(case: Case, device, amp: bool, method: str, channels_last: bool = False):
    """Model, volume, targets and the two callables (MONAI inference, medcam) of one case.

    ``channels_last``: model and volume in ``torch.channels_last_3d`` (NDHWC) for both, as a user would set it.
    """
    torch.manual_seed(0)
    model = (
        SegResNet(
            spatial_dims=3,
            in_channels=case.shape[0],
            out_channels=case.out_channels,
            init_filters=16,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
        )
        .to(device)
        .eval()
    )
    x = torch.randn((1, *case.shape), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    inferer = SlidingWindowInferer(
        roi_size=case.roi, sw_batch_size=case.sw_batch, overlap=case.overlap, mode="gaussian"
    )
    tl, give_output = make_targets(case, device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return sliding_window_inference(x, case.roi, case.sw_batch, model, overlap=case.overlap, mode="gaussian")

    cam = medcam.METHODS[method](
        model,
        layer="down_layers.3",
        inferer=inferer,
        amp=amp,
        amp_dtype=dtype if amp else None,
    )
    given = infer().float() if give_output else None
    res = {}

    def explain():
        res["r"] = cam.explain(x, tl, output=given)

    return infer, explain, cam, tl, res


def memory_only(case: Case, amp: bool, method: str, channels_last: bool = False) -> dict:
    """Peak RSS growth of one inference and one explanation (fresh processes each), no timing: for cases whose
    inference is too slow to repeat on a CPU (``--memory-only``)."""
    m_inf = cpu_peak_rss(case, amp, method, "infer", channels_last)
    m_cam = cpu_peak_rss(case, amp, method, "explain", channels_last)
    return {
        "case": case.name,
        "method": method,
        "input_mib": round(4 * torch.Size(case.shape).numel() / 2**20, 1),
        "inference_peak_mib": round(m_inf / 2**20, 1),
        "medcam_peak_mib": round(m_cam / 2**20, 1),
        "memory_ratio": round(m_cam / max(m_inf, 1), 3),
    }


def run_case(case: Case, device, amp: bool, repeats: int, method: str, channels_last: bool = False):
    infer, explain, cam, tl, res = setup(case, device, amp, method, channels_last)
    infer(), explain()  # warm-up (cuDNN autotune, allocator)
    t_inf, m_inf, t_cam, m_cam = measure_alternately(infer, explain, device, repeats)
    if device.type == "cpu":
        m_inf = cpu_peak_rss(case, amp, method, "infer", channels_last)
        m_cam = cpu_peak_rss(case, amp, method, "explain", channels_last)
    r = res["r"]
    return {
        "case": case.name,
        "targets": [repr(t)[:40] for t in tl],
        "method": method,
        "sw_batch_size": case.sw_batch,
        "windows": r.stats["windows"],
        "backward_windows": r.stats["backward_windows"],
        "inference_s": round(t_inf, 3),
        "medcam_s": round(t_cam, 3),
        "time_ratio": round(t_cam / t_inf, 3),
        "inference_peak_mib": round(m_inf / 2**20, 1),
        "medcam_peak_mib": round(m_cam / 2**20, 1),
        "memory_ratio": round(m_cam / max(m_inf, 1), 3),
    }


def probe_memory(spec: str, amp: bool, method: str, channels_last: bool) -> None:
    """Child process of :func:`cpu_peak_rss`: print the peak RSS growth of one call."""
    name, which = spec.split(":")
    case = next(c for cs in CASES.values() for c in cs if c.name == name)
    infer, explain, *_ = setup(case, torch.device("cpu"), amp, method, channels_last)
    with PeakRSS() as p:
        (infer if which == "infer" else explain)()
    print(p.value)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--cases", default=None, help="comma list of groups or case names (default: brats,ct on GPU, cpu_small on CPU)"
    )
    ap.add_argument("--amp", action="store_true", help="autocast both inference and medcam (fp16 on GPU, bf16 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="hirescam", choices=sorted(medcam.METHODS))
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True for both")
    ap.add_argument("--channels-last", action="store_true", help="model and volume in channels_last_3d, for both")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse, for both (what the medcam command does for itself)",
    )
    ap.add_argument("--memory-only", action="store_true", help="CPU: peak memory of one call each, no timing")
    ap.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # CASE:infer|explain (child process)
    args = ap.parse_args()
    if args.probe_memory:
        return probe_memory(args.probe_memory, args.amp, args.method, args.channels_last)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.keep_freed_memory and not cpu_memory.keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this C library does not take mallopt settings")
    device = torch.device(args.device)
    groups = args.cases or ("brats,ct" if device.type == "cuda" else "cpu_small")
    selected = []
    for g in groups.split(","):
        selected += CASES.get(g, [c for cs in CASES.values() for c in cs if c.name == g])
    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "amp": args.amp,
        "cudnn_benchmark": args.cudnn_benchmark,
        "channels_last": args.channels_last,
        "keep_freed_memory": args.keep_freed_memory,
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    for case in selected:
        if args.memory_only:
            info["results"].append(memory_only(case, args.amp, args.method, args.channels_last))
            print(json.dumps(info["results"][-1]), flush=True)
            continue
        info["results"].append(run_case(case, device, args.amp, args.repeats, args.method, args.channels_last))
        print(json.dumps(info["results"][-1]), flush=True)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
