"""Shared fixtures of the pipeline tests: MONAI bundle folders written from the model zoo's own configs, a real BraTS
case cropped around its tumour, and a small CT volume stored in a non-RAS orientation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
REAL_CASES = Path("/work/shared/data/brats_real_cases")
#: the crop of the real case (voxels of its 240 x 240 x 155 grid) around the tumour of tcga_fg_6692
CROP = (slice(50, 114), slice(52, 116), slice(64, 112))


def zoo_config(name: str) -> dict:
    """A model zoo bundle's ``configs/inference.json`` as shipped (tests/data/README.md names the source)."""
    return json.loads((DATA / f"{name}_inference.json").read_text())


def write_bundle(root: Path, config: dict, seed: int) -> Path:
    """A bundle folder: ``configs/inference.json`` = ``config`` (written unchanged), ``models/model.pt`` = the
    seeded state_dict of the network its ``network_def`` builds (MONAI's ConfigParser, as the bundle does)."""
    from monai.bundle import ConfigParser

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    parser = ConfigParser(config)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def bundle_components(bundle: Path, files: list[Path] | Path, roi_size=None) -> dict:
    """What the bundle's own components give for one case, run as ``monai.bundle run`` runs them: its
    preprocessing, network + weights, inferer, and the postprocessing transforms that form the prediction
    (everything up to, not including, ``Lambdad``/``SaveImaged``). ``roi_size`` overrides the inferer's window as
    ``--roi-size`` does. Returns ``{"image", "logits" [1, C, *S], "pred" (original grid)}``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    if roi_size is not None:
        inferer.roi_size = tuple(roi_size)
    items = parser.get("postprocessing")["transforms"]
    keep = [i for i, t in enumerate(items) if t["_target_"] in ("Activationsd", "Invertd", "AsDiscreted")]
    post = Compose([parser.get_parsed_content(f"postprocessing#transforms#{i}") for i in keep])
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    d = pre({"image": [str(f) for f in files] if isinstance(files, list) else str(files)})
    with torch.no_grad():
        logits = inferer(d["image"][None], net)
    out = post({"image": d["image"], "pred": logits[0]})
    return {"image": d["image"], "logits": logits, "pred": np.asarray(out["pred"])}


@pytest.fixture(scope="session")
def real_brats_case(tmp_path_factory) -> Path:
    """The real case tcga_fg_6692 cropped to 64 x 64 x 48 voxels around its tumour, in the BraTS 2021 layout
    (``<ID>_t1.nii.gz`` ...; nibabel's slicer keeps the geometry: affine moved to the crop)."""
    src = REAL_CASES / "tcga_fg_6692"
    if not src.is_dir():
        pytest.skip("the shared real BraTS cases are not on this machine")
    case = tmp_path_factory.mktemp("real") / "TCGA-FG-6692"
    case.mkdir()
    for m in ("t1", "t1ce", "t2", "flair"):
        img = nib.load(str(src / f"{m}.nii.gz"))
        nib.save(img.slicer[CROP], str(case / f"{case.name}_{m}.nii.gz"))
    seg = nib.load(str(src / "seg_fused_simple.nii.gz"))
    nib.save(seg.slicer[CROP], str(case / f"{case.name}_seg.nii.gz"))
    return case


@pytest.fixture(scope="session")
def ct_volume(tmp_path_factory) -> Path:
    """A small CT-like volume (HU) stored LPS-like with anisotropic voxels (3 x 3.5 x 5 mm) and a bright blob: the
    spleen bundle's preprocessing reorients it to RAS and resamples it to 1.5 x 1.5 x 2 mm."""
    rng = np.random.default_rng(7)
    shape = (40, 32, 16)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    blob = ((ii - 22) / 9.0) ** 2 + ((jj - 14) / 7.0) ** 2 + ((kk - 8) / 4.0) ** 2 < 1
    hu = np.where(blob, 110.0, -40.0) + rng.normal(0, 25, shape)
    affine = np.diag([-3.0, -3.5, 5.0, 1.0])
    affine[:3, 3] = (60.0, 50.0, -30.0)
    path = tmp_path_factory.mktemp("ct") / "ct_case.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), str(path))
    return path
