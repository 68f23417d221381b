"""Build a real nnU-Net v2 model folder from phantoms, with nnU-Net's own entry points (run in a subprocess).

``python -m tests._nnunet_build ROOT [--regions] [--patch X Y Z] [--spacing MM]`` writes

* ``ROOT/raw/Dataset50N_Phantom/`` (imagesTr, labelsTr, dataset.json): 3 phantoms at 8 mm (``--spacing``: e.g. 4 mm
  for the benchmark's bigger cases), 4 channels;
* planning + preprocessing by ``nnUNetv2_plan_and_preprocess`` (the command nnU-Net users run);
* ``ROOT/results/Dataset50N_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres/`` with ``plans.json``,
  ``dataset.json`` and ``fold_0``/``fold_1`` ``checkpoint_final.pth`` written by ``nnUNetTrainer.save_checkpoint``
  after ``nnUNetTrainer.initialize()`` (the trainer's own network and seeded initialisation; no training).

``--patch`` overrides the configuration's patch size in the model folder's plans (so that the tiny cases need
several tiles). It runs in its own process because nnU-Net reads its folders from environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SPACING = 8.0
CASES = (1, 2, 3)


def write_raw(raw: Path, name: str, regions: bool, spacing: float = SPACING) -> Path:
    from medcam.data.phantoms import CHANNELS, LABEL_ET, generate_phantom

    ds = raw / name
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for seed in CASES:
        ph = generate_phantom(seed=seed, spacing_mm=spacing)
        cid = f"phantom_{seed:03d}"
        for c, _ in enumerate(CHANNELS):
            img = nib.Nifti1Image(ph.image[c].astype(np.float32), ph.affine)
            nib.save(img, ds / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        lab = ph.label.astype(np.uint8)
        lab[lab == LABEL_ET] = 3
        nib.save(nib.Nifti1Image(lab, ph.affine), ds / "labelsTr" / f"{cid}.nii.gz")
    if regions:  # BraTS regions, sigmoid outputs (nnU-Net's region-based training)
        labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]}
        extra = {"regions_class_order": [2, 1, 3]}
    else:
        labels = {"background": 0, "necrosis": 1, "edema": 2, "enhancing tumor": 3}
        extra = {}
    dj = {
        "channel_names": {str(i): m.upper() for i, m in enumerate(CHANNELS)},
        "labels": labels,
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
        **extra,
    }
    (ds / "dataset.json").write_text(json.dumps(dj, indent=2))
    return ds


def write_label_variant(root: Path, region_folder: Path, trainer) -> Path:
    """A label-based (softmax) model folder on the same plans: ``Dataset501_PhantomLabels``, fold_0 only.

    Its network is the trainer's ``build_network_architecture`` (seeded), saved in the trainer's checkpoint format.
    """
    import copy

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(load_json(str(region_folder / "plans.json")))
    plans["dataset_name"] = "Dataset501_PhantomLabels"
    dj = copy.deepcopy(trainer.dataset_json)
    dj["labels"] = {"background": 0, "necrosis": 1, "edema": 2, "enhancing tumor": 3}
    dj.pop("regions_class_order", None)
    folder = root / "results" / "Dataset501_PhantomLabels" / region_folder.name
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(7)
    net = type(trainer).build_network_architecture(pm, cm, len(dj["channel_names"]), 4, enable_deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    ckpt = {
        "network_weights": net.state_dict(),
        "init_args": {"configuration": "3d_fullres", "fold": 0},
        "trainer_name": type(trainer).__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    save_json(plans, str(folder / "plans.json"), sort_keys=False)
    save_json(dj, str(folder / "dataset.json"), sort_keys=False)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--regions", action="store_true")
    ap.add_argument("--patch", type=int, nargs=3, default=None)
    ap.add_argument("--spacing", type=float, default=SPACING, help="phantom voxel size in mm (default 8)")
    ap.add_argument("--skip-planning", action="store_true", help="reuse ROOT's raw data and plans")
    args = ap.parse_args()
    root: Path = args.root.resolve()
    dsid = 502 if args.regions else 501
    name = f"Dataset{dsid}_Phantom"
    env = {
        **os.environ,
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    if not args.skip_planning:
        write_raw(root / "raw", name, args.regions, args.spacing)
        exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
        subprocess.run(
            [str(exe), "-d", str(dsid), "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.set_num_threads(1)
    folder = None
    for fold in (0, 1):
        torch.manual_seed(fold)
        trainer = get_trainer_from_args(str(dsid), "3d_fullres", fold, device=torch.device("cpu"))
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirror axes
        with torch.no_grad():  # make the seeded init non-trivial: biases and norms away from 0/1
            for p in trainer.network.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        folder = Path(trainer.output_folder_base)
    assert folder is not None
    plans = trainer.plans_manager.plans
    if args.patch:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(args.patch)
    save_json(plans, str(folder / "plans.json"), sort_keys=False)  # as nnUNetTrainer.on_train_start does
    save_json(trainer.dataset_json, str(folder / "dataset.json"), sort_keys=False)
    if args.regions:
        write_label_variant(root, folder, trainer)
    print(folder)


if __name__ == "__main__":
    main()
