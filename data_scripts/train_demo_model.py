#!/usr/bin/env python
"""Train the shipped demo SegResNet (4 channels T1/T1ce/T2/FLAIR -> 3 sigmoid outputs TC/WT/ET) on phantoms.

Data: a pool of BraTS-like phantoms (:func:`medcam.data.phantoms.generate_phantom`, seeds ``0 .. n_train-1``,
generated at the demo resolution) passed through the SAME MONAI preprocessing that inference uses
(:func:`medcam.data.preprocessing.build_preprocessing` with :func:`medcam.models.demo.demo_preprocessing_kwargs`:
RAS orientation, 2 mm spacing, channel-wise z-score over non-zero voxels). Held-out seeds (10000+) are never
trained on (see ``evaluate_demo_model.py``).

Augmentation (all in torch, on the training device, from seeded generators) so the model transfers to real scans:

* per-case, in raw intensity space: tumour-contrast jitter (each of NCR/ED/ET scaled per channel by a random factor
  through smoothed region masks), a random low-frequency multiplicative bias field, then the z-score normalisation
  (numerically identical to MONAI's ``NormalizeIntensityd(nonzero=True, channel_wise=True)``, checked at start-up);
* spatial: a random ``roi``-sized crop sampled through a random affine (rotation +-15 deg per axis, isotropic
  scale 0.8-1.2 with +-5 % anisotropy, random flips on every axis), trilinear for the image, labels re-thresholded;
* per-crop, in z-space: per-channel scale 0.85-1.15 and shift +-0.15 (brain voxels only), random blur, Gaussian
  noise (sigma 0-0.12).

Loss: MONAI ``DiceCELoss(sigmoid=True)``. Optimiser AdamW with linear warm-up and cosine decay. Determinism: fixed
seeds, ``torch.use_deterministic_algorithms(True)`` (``warn_only`` on CUDA, where trilinear-upsampling backward has
no deterministic kernel); CPU runs are bit-reproducible for the same thread count.

Usage::

    python data_scripts/train_demo_model.py --quick               # smoke test (about a minute on CPU)
    python data_scripts/train_demo_model.py                       # CPU: 1200 steps, batch 2, 64^3 (slow: seconds/step)
    # the shipped weights (one H100, about 6.5 min; see medcam/models/MODEL_CARD.md):
    python data_scripts/train_demo_model.py --device cuda --n-train 200 --n-val 10 --batch 4 --steps 2100 --stop-at 2005
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medcam.models.demo import (  # noqa: E402
    DEMO_ARCH,
    DEMO_ROI_SIZE,
    DEMO_SPACING_MM,
    demo_network,
    demo_preprocessing_kwargs,
)

#: first held-out phantom seed (training uses 0 .. n_train - 1)
HELDOUT_SEED0 = 10000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------- data
def make_case(seed: int, spacing: float = DEMO_SPACING_MM, normalize: bool = False) -> dict[str, np.ndarray]:
    """One phantom through the demo preprocessing (without the z-score unless ``normalize``), cropped to the brain.

    Returns:
        dict: ``image`` float32 [4, X, Y, Z] (raw intensities, 0 outside the brain), ``regions`` uint8 [3, X, Y, Z]
        (TC, WT, ET), ``tissue`` float32 [3, X, Y, Z] smoothed NCR/ED/ET masks, ``seed``.
    """
    from monai.data import MetaTensor
    from scipy import ndimage

    from medcam.data.brats import labels_to_regions
    from medcam.data.phantoms import generate_phantom
    from medcam.data.preprocessing import build_preprocessing

    ph = generate_phantom(seed=seed, spacing_mm=spacing)
    kw = dict(demo_preprocessing_kwargs())
    kw["normalize"] = normalize
    kw["spacing"] = (spacing,) * 3
    tf = build_preprocessing(keys=("image", "label"), **kw)
    lab = np.stack([ph.label == v for v in (1, 2, 4)]).astype(np.float32)  # NCR, ED, ET one-hot (BraTS 2021)
    aff = torch.as_tensor(ph.affine, dtype=torch.float64)
    out = tf(
        {
            "image": MetaTensor(torch.from_numpy(ph.image.copy()), affine=aff),
            "label": MetaTensor(torch.from_numpy(lab), affine=aff.clone()),
        }
    )
    img = np.asarray(out["image"].as_tensor().numpy(), dtype=np.float32)
    tissue = np.asarray(out["label"].as_tensor().numpy() > 0.5)
    label = np.zeros(tissue.shape[1:], np.int16)
    for v, m in zip((1, 2, 4), tissue):
        label[m] = v
    regions = labels_to_regions(label, "brats2021").astype(np.uint8)
    nz = np.argwhere(np.any(img != 0, axis=0))
    lo, hi = np.maximum(nz.min(0) - 2, 0), nz.max(0) + 3
    sl = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
    soft = np.stack([ndimage.gaussian_filter(m.astype(np.float32), 1.0) for m in tissue])
    return {
        "image": np.ascontiguousarray(img[sl]),
        "regions": np.ascontiguousarray(regions[sl]),
        "tissue": np.ascontiguousarray(soft[sl]),
        "seed": seed,
    }


def build_pool(seeds: Sequence[int], workers: int) -> list[dict[str, np.ndarray]]:
    """Generate the phantom pool (in parallel processes when ``workers > 1``); order follows ``seeds``."""
    if workers <= 1:
        return [make_case(s) for s in seeds]
    # spawn, not fork: forking after torch/OpenMP threads started can deadlock the children
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(make_case, seeds, chunksize=1))


def zscore_nonzero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Channel-wise z-score over ``mask`` voxels (0 elsewhere), as ``NormalizeIntensity(nonzero, channel_wise)``.

    Args:
        x: [C, X, Y, Z]; mask: bool [C, X, Y, Z] (the non-zero voxels of each channel).
    """
    out = torch.zeros_like(x)
    for c in range(x.shape[0]):
        v = x[c][mask[c]]
        if v.numel() == 0:
            continue
        std = v.std(unbiased=False)
        out[c][mask[c]] = (v - v.mean()) / (std if std > 0 else 1.0)
    return out


def check_normalisation(seed: int) -> float:
    """Max |difference| between our z-score and the MONAI pipeline's on one phantom (must be ~0)."""
    raw = make_case(seed, normalize=False)["image"]
    ref = make_case(seed, normalize=True)["image"]
    x = torch.from_numpy(raw)
    return float((zscore_nonzero(x, x != 0) - torch.from_numpy(ref)).abs().max())


# ----------------------------------------------------------------------------------------------------- augmentation
def _rot(angles: Sequence[float]) -> torch.Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).double()


class Augmenter:
    """Draws augmented training crops from the pool (see the module docstring); every random number comes from
    ``gen`` (CPU) or ``dgen`` (device), so a run is reproducible."""

    def __init__(
        self,
        pool: list[dict[str, torch.Tensor]],
        roi: tuple[int, int, int],
        gen: torch.Generator,
        dgen: torch.Generator,
        device: torch.device,
        contrast_jitter: float = 0.25,
        p_no_et: float = 0.0,
    ):
        self.pool, self.roi, self.gen, self.dgen, self.device = pool, roi, gen, dgen, device
        self.contrast_jitter, self.p_no_et = float(contrast_jitter), float(p_no_et)
        # per-channel intensity ratio NCR / ET: turns the enhancing rim into non-enhancing core tissue
        from medcam.data.phantoms import CHANNELS, TISSUE_INTENSITY

        self.ncr_over_et = torch.tensor(
            [TISSUE_INTENSITY[c][3] / TISSUE_INTENSITY[c][5] for c in CHANNELS], dtype=torch.float32, device=device
        )
        r = [torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2.0 for n in roi]
        self.offsets = torch.stack(torch.meshgrid(*r, indexing="ij"), -1).reshape(-1, 3)  # [N, 3] voxel offsets

    def u(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (1,), generator=self.gen, dtype=torch.float64)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented crop: image [4, *roi] float32, regions [3, *roi] float32 (0/1)."""
        case = self.pool[int(torch.randint(len(self.pool), (1,), generator=self.gen))]
        img, tissue, reg = case["image"], case["tissue"], case["regions"]
        brain = img != 0
        # tumour-contrast jitter (per channel and region) and a low-frequency bias field, in raw intensity space
        cj = self.contrast_jitter
        fac = self.u(-cj, cj, 4, 3).float().to(self.device)  # [C, region]
        field = 1.0 + torch.einsum("cr,rxyz->cxyz", fac, tissue)
        if self.p_no_et > 0 and float(self.u(0, 1)) < self.p_no_et:
            # non-enhancing tumour: ET tissue rendered as necrotic/non-enhancing core, relabelled (TC unchanged)
            field = field * (1.0 + (self.ncr_over_et[:, None, None, None] - 1.0) * tissue[2:3])
            reg = torch.cat([reg[:2], torch.zeros_like(reg[2:3])], 0)
        coarse = torch.randn((4, 1, 3, 3, 3), generator=self.dgen, device=self.device) * float(self.u(0.0, 0.12))
        bias = torch.exp(F.interpolate(coarse, size=img.shape[1:], mode="trilinear", align_corners=True))[:, 0]
        x = zscore_nonzero(img * field.clamp_min(0.3) * bias, brain)
        # spatial: random affine around a random centre (half the time near the tumour)
        shape = torch.tensor(img.shape[1:], dtype=torch.float64)
        if float(self.u(0, 1)) < 0.5:
            idx = torch.nonzero(reg[1]).double()
            centre = idx.mean(0).cpu() + self.u(-12, 12, 3)
        else:
            centre = shape / 2 + (self.u(-0.25, 0.25, 3) * shape)
        ang = (self.u(-15, 15, 3) * math.pi / 180).tolist()
        scale = float(self.u(0.8, 1.2)) * self.u(0.95, 1.05, 3)
        flips = torch.where(self.u(0, 1, 3) < 0.5, -1.0, 1.0).double()
        m = (_rot(ang) @ torch.diag(scale * flips)).to(self.device)
        src = self.offsets @ m.T + centre.to(self.device)  # [N, 3] source voxel coords (x, y, z)
        norm = 2.0 * src / (shape.to(self.device) - 1) - 1.0
        grid = norm.flip(-1).float().reshape(1, *self.roi, 3)  # grid_sample wants (z, y, x) order last
        both = torch.cat([x, reg.float()], 0)[None]
        out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        xi, yr = out[:4], (out[4:] > 0.5).float()
        bmask = (xi != 0).any(0, keepdim=True).float()
        # intensity in z-space (brain voxels only): scale/shift, blur, noise
        xi = (
            xi * self.u(0.85, 1.15, 4, 1, 1, 1).float().to(self.device)
            + self.u(-0.15, 0.15, 4, 1, 1, 1).float().to(self.device) * bmask
        )
        if float(self.u(0, 1)) < 0.2:
            w = float(self.u(0.2, 0.8))
            xi = (1 - w) * xi + w * F.avg_pool3d(xi[None], 3, stride=1, padding=1)[0]
        sigma = float(self.u(0.0, 0.12))
        xi = xi + sigma * torch.randn(xi.shape, generator=self.dgen, device=self.device) * bmask
        return xi * bmask, yr

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[self.sample() for _ in range(n)])
        return torch.stack(xs), torch.stack(ys)


# ------------------------------------------------------------------------------------------------------- evaluation
def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    s = pred.sum() + ref.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, ref).sum() / s)


@torch.no_grad()
def evaluate_pool(
    net: torch.nn.Module, cases: list[dict[str, np.ndarray]], device: torch.device, roi: tuple[int, int, int]
) -> np.ndarray:
    """Dice [n_cases, 3] (TC, WT, ET) with sliding-window inference on z-scored whole cases."""
    from monai.inferers import sliding_window_inference

    net.eval()
    rows = []
    for c in cases:
        x = torch.from_numpy(c["image"]).to(device)
        x = zscore_nonzero(x, x != 0)[None]
        p = sliding_window_inference(x, roi, 4, net, overlap=0.5, mode="gaussian")[0].sigmoid().cpu().numpy() > 0.5
        rows.append([dice(p[k], c["regions"][k] > 0) for k in range(3)])
    return np.asarray(rows)


def benchmark_step(
    pool: list[dict[str, torch.Tensor]],
    roi: tuple[int, int, int],
    batch: int,
    device: torch.device,
    cuda: bool,
    n: int = 15,
) -> float:
    """Seconds per training step, timed on a throw-away network and generators (the real run is unaffected)."""
    from monai.losses import DiceCELoss

    aug = Augmenter(
        pool, roi, torch.Generator().manual_seed(12345), torch.Generator(device=device).manual_seed(12345), device
    )
    net = demo_network().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    for i in range(n + 3):
        if i == 3:
            if cuda:
                torch.cuda.synchronize(device)
            t = time.time()
        x, y = aug.batch(batch)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.time() - t) / n


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--steps", type=int, default=None, help="optimisation steps (default 1200 on CPU, 4000 on CUDA)")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="alternative to --steps: passes over the pool, one crop per case per pass",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="crop size (default 64^3 on CPU, 96^3 on CUDA)")
    ap.add_argument("--n-train", type=int, default=48, help="training phantoms (seeds 0 .. n-1)")
    ap.add_argument("--n-val", type=int, default=4, help="held-out phantoms evaluated at the end (seeds 10000+)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 1))))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="without --steps/--epochs: time 15 steps of a throw-away copy, then choose the step count "
        "that fits this many minutes (logged; rerun with --steps N to reproduce)",
    )
    ap.add_argument(
        "--contrast-jitter",
        type=float,
        default=0.25,
        help="tumour-contrast jitter: NCR/ED/ET scaled per channel by 1 +- this",
    )
    ap.add_argument(
        "--p-no-et",
        type=float,
        default=0.0,
        help="probability of rendering the enhancing rim as non-enhancing core (ET label removed)",
    )
    ap.add_argument("--init", default=None, help="start from this state_dict (fine-tuning) instead of random")
    ap.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this many steps while keeping the --steps schedule (to reproduce a run that "
        "was stopped by --max-minutes)",
    )
    ap.add_argument("--max-minutes", type=float, default=None, help="safety stop: save and quit after this time")
    ap.add_argument("--out", default=str(ROOT / "medcam/models/weights/demo_segresnet.pt"))
    ap.add_argument("--info-out", default="/tmp/demo_segresnet_train.json", help="training summary (JSON)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 phantoms, 4 steps, 32^3 crops")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.quick:
        args.n_train, args.n_val, args.steps, args.roi, args.batch = 3, 1, 4, [32, 32, 32], 1
    roi = tuple(args.roi or (DEMO_ROI_SIZE if cuda else (64, 64, 64)))
    t0 = time.time()
    err = check_normalisation(HELDOUT_SEED0 + 999)
    log(f"z-score vs MONAI NormalizeIntensityd: max abs diff {err:.2e}")
    if err > 1e-3:
        raise SystemExit("normalisation mismatch: training would not match inference preprocessing")
    seeds = list(range(args.n_train))
    pool_np = build_pool(seeds, args.workers)
    val_np = build_pool([HELDOUT_SEED0 + i for i in range(args.n_val)], args.workers)
    log(
        f"pool: {len(pool_np)} training phantoms + {len(val_np)} held-out in {time.time() - t0:.1f} s; "
        f"shapes e.g. {pool_np[0]['image'].shape}"
    )
    pool = [
        {
            "image": torch.from_numpy(c["image"]).to(device),
            "tissue": torch.from_numpy(c["tissue"]).to(device),
            "regions": torch.from_numpy(c["regions"]).to(device),
        }
        for c in pool_np
    ]

    steps = args.steps
    if steps is None and args.epochs is not None:
        steps = max(1, args.epochs * len(pool) // args.batch)
    if steps is None and args.time_budget_min is not None:
        sec = benchmark_step(pool, roi, args.batch, device, cuda)
        steps = max(50, int(args.time_budget_min * 60 / sec) // 50 * 50)
        log(
            f"benchmark: {sec:.3f} s/step -> {steps} steps for {args.time_budget_min} min "
            f"(reproduce with --steps {steps})"
        )
    steps = steps or (4000 if cuda else 1200)
    gen = torch.Generator().manual_seed(args.seed + 1)
    dgen = torch.Generator(device=device).manual_seed(args.seed + 2)
    aug = Augmenter(pool, roi, gen, dgen, device, args.contrast_jitter, args.p_no_et)

    from monai.losses import DiceCELoss

    torch.manual_seed(args.seed)
    net = demo_network()
    if args.init:
        net.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        log(f"initialised from {args.init}")
    net = net.to(device)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    warm = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    log(
        f"training {steps} steps, batch {args.batch}, roi {roi}, lr {args.lr}, device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    t1, run, done = time.time(), [], 0
    net.train()
    for step in range(steps):
        x, y = aug.batch(args.batch)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.append(float(loss.detach()))
        done = step + 1
        if done % 50 == 0 or done == steps:
            el = time.time() - t1
            log(
                f"step {done}/{steps} loss {np.mean(run[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{el / done:.2f} s/step"
            )
        if args.stop_at is not None and done >= args.stop_at:
            log(f"stopped at step {done} (--stop-at)")
            break
        if args.max_minutes is not None and (time.time() - t0) / 60 > args.max_minutes:
            log(f"time limit reached after {done} steps")
            break
    train_s = time.time() - t1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    d = evaluate_pool(net, val_np, device, roi)
    info = {
        "command": " ".join(sys.argv),
        "init": args.init,
        "contrast_jitter": args.contrast_jitter,
        "p_no_et": args.p_no_et,
        "steps_done": done,
        "steps_planned": steps,
        "batch": args.batch,
        "roi": list(roi),
        "lr": args.lr,
        "n_train": args.n_train,
        "train_seeds": [0, args.n_train - 1],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "final_loss_last50": float(np.mean(run[-50:])),
        "arch": {k: v for k, v in DEMO_ARCH.items()},
        "heldout_dice_mean_TC_WT_ET": d.mean(0).round(4).tolist(),
        "heldout_seeds": len(val_np),
        "weights_bytes": out.stat().st_size,
    }
    Path(args.info_out).write_text(json.dumps(info, indent=1, default=str))
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); held-out Dice TC/WT/ET {d.mean(0).round(3).tolist()}")
    log(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
