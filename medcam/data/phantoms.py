"""Deterministic BraTS-like phantom cases built on real anatomy (MNI152 2009c template shipped with nilearn).

The template T1 and grey/white-matter probability maps (197 x 233 x 189, 1 mm, RAS) are read as files from the
installed ``nilearn`` distribution (nilearn is NOT imported). CSF = brain mask - GM - WM. A tumour is placed with
its centre in white matter (radius 10-18 mm, lumpy boundary); with d = normalised distance from the centre:
necrosis d < 0.6, enhancing rim 0.6 <= d < 1, oedema following white matter out to about d = 2.1. Mass effect is
a smooth monotone radial warp of the anatomy. Intensities (relative to normal brain, measured on real BraTS cases)
come from :data:`TISSUE_INTENSITY`; a smooth multiplicative bias field, Rician noise and skull stripping follow.

Everything that is independent of the anatomy (tumour centre, radius, lumpiness, warp strength, bias field, noise)
varies with ``seed``; the same seed always gives the same case.

Orientation: arrays and affines are LPS by default (like BraTS: affine diag(-spacing, -spacing, +spacing)), or RAS
with ``orientation="RAS"``. Affines are nibabel/MONAI-style voxel -> RAS world (mm) matrices either way.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import PhantomError
from ..geometry import spacing_of
from ..types import PathLike

logger = logging.getLogger(__name__)


#: channel order of :attr:`Phantom.image`
CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
_TISSUES = ("WM", "GM", "CSF", "NCR", "ED", "ET")
#: intensity relative to normal brain, per modality (rows) and tissue (columns WM, GM, CSF, NCR, ED, ET)
TISSUE_INTENSITY: dict[str, tuple[float, ...]] = {
    "t1": (1.15, 0.80, 0.35, 0.55, 0.85, 0.65),
    "t1ce": (1.10, 0.82, 0.40, 0.60, 0.85, 1.70),
    "t2": (0.70, 0.95, 2.60, 2.40, 1.85, 2.10),
    "flair": (0.80, 1.05, 0.30, 1.60, 2.05, 1.95),
}
#: intensity (file units) of normal brain per modality, so files look like BraTS int16 data
BRAIN_LEVEL: dict[str, float] = {"t1": 500.0, "t1ce": 600.0, "t2": 400.0, "flair": 350.0}
#: BraTS 2017-2021 labels used in :attr:`Phantom.label`
LABEL_NCR, LABEL_ED, LABEL_ET = 1, 2, 4

_TEMPLATE = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass
class Phantom:
    """A generated case.

    Attributes:
        image: float32 [4, X, Y, Z] channels T1, T1ce, T2, FLAIR (BraTS-like units, 0 outside the brain).
        label: int16 [X, Y, Z] BraTS 2017-2021 labels 0, 1 (NCR), 2 (ED), 4 (ET).
        affine: 4x4 voxel -> RAS world (mm); LPS-ordered array axes unless ``orientation="RAS"``.
        brain_mask: bool [X, Y, Z].
        centre_mm: tumour centre in RAS world coordinates (mm).
        radius_mm: tumour radius (mm) at d = 1 before lumps.
        seed: the seed used.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    centre_mm: np.ndarray
    radius_mm: float
    seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm)."""
        sx, sy, sz = spacing_of(self.affine)
        return sx, sy, sz


def template_path(name: str) -> Path:
    """Path of nilearn's MNI152 2009 template file ``name`` in {"t1", "gm", "wm"} (nilearn is not imported)."""
    try:
        dist = importlib.metadata.distribution("nilearn")
    except importlib.metadata.PackageNotFoundError as exc:
        raise PhantomError(
            "The phantom generator needs the 'nilearn' package (for its MNI152 template files); "
            "install it with `pip install nilearn`."
        ) from exc
    path = Path(str(dist.locate_file(_TEMPLATE.format(name))))
    if not path.is_file():
        raise PhantomError(f"MNI152 template file '{path}' not found in the nilearn installation; reinstall nilearn.")
    return path


def _read_template(name: str) -> nib.Nifti1Image:
    img = nib.load(str(template_path(name)))
    if not isinstance(img, nib.Nifti1Image):
        raise PhantomError(f"MNI152 template '{template_path(name)}' is not a NIfTI image; reinstall nilearn.")
    return img


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm) as float32 in [0, 1] at 1 mm, and the template affine (RAS)."""
    imgs = [_read_template(n) for n in ("t1", "gm", "wm")]
    arrs = [np.asarray(im.dataobj, dtype=np.float32) / 255.0 for im in imgs]
    for a in arrs:
        a.setflags(write=False)
    return arrs[0], arrs[1], arrs[2], np.asarray(imgs[0].affine, dtype=float)


def _smooth_field(rng: np.random.Generator, coords: Sequence[np.ndarray], n_terms: int, max_freq: float) -> np.ndarray:
    """Sum of random low-frequency cosines over normalised coordinates in [-1, 1]; roughly unit amplitude."""
    out = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for _ in range(n_terms):
        k = rng.normal(size=3)
        k *= rng.uniform(0.3, max_freq) / (np.linalg.norm(k) + 1e-9)
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(np.pi * (k[0] * coords[0] + k[1] * coords[1] + k[2] * coords[2]) + phase).astype(np.float32)
    return out / np.sqrt(n_terms / 2.0)


def generate_phantom(
    seed: int = 0,
    spacing_mm: float | Sequence[float] = 2.0,
    *,
    orientation: str = "LPS",
    noise: float = 0.03,
    bias: float = 0.15,
) -> Phantom:
    """Generate one deterministic BraTS-like case from the MNI152 anatomy.

    Args:
        seed: random seed (tumour centre/radius/lumpiness, warp, bias field, noise).
        spacing_mm: voxel size in mm (isotropic float or 3 floats); 1.0 gives the template grid 197 x 233 x 189,
            2.0 gives 99 x 117 x 95 (about 1 s), 3.0 gives 66 x 78 x 63.
        orientation: "LPS" (BraTS-like array axes) or "RAS" (template axes).
        noise: Rician noise sigma relative to normal-brain intensity.
        bias: bias-field amplitude (fraction, multiplicative exp field).

    Returns:
        :class:`Phantom`.

    Raises:
        PhantomError: bad parameters or missing template files.
    """
    sp = _check_phantom_args(spacing_mm, orientation)
    rng = np.random.default_rng(int(seed))
    t1, gm, wm, aff0 = _templates()
    shape, affine, world = _output_grid(t1.shape, aff0, sp)
    tumour = _draw_tumour(rng, t1, wm, aff0)
    rel = [(world[a] - tumour.centre[a]).astype(np.float32) for a in range(3)]
    rho = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + 1e-6
    lumps = _smooth_field(rng, [r / rho for r in rel], n_terms=6, max_freq=1.5)
    d = rho / (tumour.radius * (1.0 + tumour.lump_amp * lumps))  # normalised distance from the centre
    src_vox = _mass_effect_coords(tumour, rel, rho, aff0, shape)
    anatomy = _sample_anatomy((t1, gm, wm), src_vox, sp)
    label = _tumour_labels(d, lumps, anatomy, sp)
    image = _render_images(rng, label, anatomy, world, sp, noise=noise, bias=bias)
    label[~anatomy.brain] = 0
    brain = anatomy.brain
    if orientation == "LPS":
        image = image[:, ::-1, ::-1, :]
        label, brain = label[::-1, ::-1, :], brain[::-1, ::-1, :]
        flip = np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        affine = affine @ flip
    return Phantom(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(label),
        affine=affine,
        brain_mask=np.ascontiguousarray(brain),
        centre_mm=np.asarray(tumour.centre, float),
        radius_mm=tumour.radius,
        seed=int(seed),
    )


def _check_phantom_args(spacing_mm: float | Sequence[float], orientation: str) -> np.ndarray:
    """The spacing as 3 floats (mm), after checking it and the orientation."""
    try:
        sp = np.asarray(spacing_mm, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        sp = np.zeros(0)  # not numbers: refused below
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.shape != (3,) or np.any(sp < 0.5) or np.any(sp > 8):
        raise PhantomError(f"spacing_mm must be between 0.5 and 8 mm (one value or three), got {spacing_mm!r}.")
    if orientation not in ("LPS", "RAS"):
        raise PhantomError(f"orientation must be 'LPS' or 'RAS', got {orientation!r}.")
    return sp


def _output_grid(
    shape0: tuple[int, ...], aff0: np.ndarray, sp: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray, list[np.ndarray]]:
    """Shape, affine (RAS) and world coordinates (mm, 3 broadcastable arrays) of the output grid: the template's
    field of view at spacing ``sp``; output voxel i sits at template voxel coordinate i * s + (s - 1) / 2."""
    nx, ny, nz = (int(v) for v in np.maximum(np.round(np.array(shape0) / sp), 2))
    offs = (sp - 1.0) / 2.0
    affine = aff0 @ np.array([[sp[0], 0, 0, offs[0]], [0, sp[1], 0, offs[1]], [0, 0, sp[2], offs[2]], [0, 0, 0, 1]])
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (nx, ny, nz)], indexing="ij", sparse=True)
    world = [affine[a, 0] * grid[0] + affine[a, 1] * grid[1] + affine[a, 2] * grid[2] + affine[a, 3] for a in range(3)]
    return (nx, ny, nz), affine, world


@dataclass(frozen=True)
class _Tumour:
    """Random tumour parameters: centre (RAS mm), radius (mm), boundary lumpiness and mass-effect strength."""

    centre: np.ndarray
    radius: float
    lump_amp: float
    warp_k: float


def _draw_tumour(rng: np.random.Generator, t1: np.ndarray, wm: np.ndarray, aff0: np.ndarray) -> _Tumour:
    """Tumour parameters, the centre in deep white matter away from the brain boundary."""
    radius = float(rng.uniform(10.0, 18.0))
    step = 3
    wm_c, brain_c = wm[::step, ::step, ::step], (t1 > 0.02)[::step, ::step, ::step]
    depth = ndimage.distance_transform_edt(brain_c) * step  # mm from outside the brain
    cand = np.argwhere((wm_c > 0.9) & (depth > 2.1 * radius * 0.55 + 8))
    if len(cand) == 0:
        cand = np.argwhere((wm_c > 0.9) & (depth > 10))
    ijk = cand[rng.integers(len(cand))] * step
    centre = (aff0 @ np.r_[ijk, 1.0])[:3] + rng.uniform(-1.0, 1.0, 3)
    lump_amp = float(rng.uniform(0.08, 0.25))
    warp_k = float(rng.uniform(0.15, 0.35))
    return _Tumour(centre, radius, lump_amp, warp_k)


def _mass_effect_coords(
    tumour: _Tumour, rel: list[np.ndarray], rho: np.ndarray, aff0: np.ndarray, shape: tuple[int, int, int]
) -> list[np.ndarray]:
    """Template voxel coordinates sampled by each output voxel: the point at radius rho from the centre samples the
    template at rho * (1 - k exp(-(rho / 2r)^2)), monotone in rho because k < 1, so the anatomy is pushed
    outwards around the tumour."""
    shrink = 1.0 - tumour.warp_k * np.exp(-((rho / (2.0 * tumour.radius)) ** 2))
    src_world = [tumour.centre[a] + rel[a] * shrink for a in range(3)]
    inv0 = np.linalg.inv(aff0)
    src_vox = [sum(inv0[a, b] * src_world[b] for b in range(3)) + inv0[a, 3] for a in range(3)]
    return [np.broadcast_to(v, shape) for v in src_vox]


@dataclass
class _Anatomy:
    """Warped anatomy on the output grid: brain mask and GM/WM/CSF fractions (GM + WM <= 1)."""

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray


def _sample_anatomy(
    templates: tuple[np.ndarray, np.ndarray, np.ndarray], src_vox: list[np.ndarray], sp: np.ndarray
) -> _Anatomy:
    """Resample the template T1, GM and WM at ``src_vox`` (anti-aliased when subsampling) into brain and tissues."""

    def sample(vol: np.ndarray) -> np.ndarray:
        if np.all(sp > 1.0):  # anti-alias before subsampling
            vol = ndimage.uniform_filter(vol, size=tuple(int(max(1, round(s))) for s in sp), mode="nearest")
        return ndimage.map_coordinates(vol, src_vox, order=1, mode="constant", cval=0.0).astype(np.float32)

    t1_s, gm_s, wm_s = (sample(v) for v in templates)
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(t1_s > 0.1, iterations=1))
    gm_s, wm_s = np.clip(gm_s, 0, 1), np.clip(wm_s, 0, 1)
    tot = gm_s + wm_s
    over = tot > 1
    gm_s[over] /= tot[over]
    wm_s[over] /= tot[over]
    csf_s = np.where(brain, np.clip(1.0 - gm_s - wm_s, 0, 1), 0).astype(np.float32)
    return _Anatomy(brain, gm_s, wm_s, csf_s)


def _tumour_labels(d: np.ndarray, lumps: np.ndarray, anatomy: _Anatomy, sp: np.ndarray) -> np.ndarray:
    """BraTS labels from the normalised distance d: NCR d < 0.6, ET 0.6 <= d < 1, oedema following white matter
    out to about d = 2.1; only inside the brain."""
    brain = anatomy.brain
    wm_smooth = ndimage.gaussian_filter(anatomy.wm, sigma=3.0 / sp)
    ed_extent = 1.15 + 0.95 * np.clip(wm_smooth * 1.2, 0, 1) + 0.1 * lumps
    label = np.zeros(brain.shape, dtype=np.int16)
    label[(d < ed_extent) & brain] = LABEL_ED
    label[(d < 1.0) & brain] = LABEL_ET
    label[(d < 0.6) & brain] = LABEL_NCR
    return label


def _render_images(
    rng: np.random.Generator,
    label: np.ndarray,
    anatomy: _Anatomy,
    world: list[np.ndarray],
    sp: np.ndarray,
    *,
    noise: float,
    bias: float,
) -> np.ndarray:
    """The 4 modalities float32 [4, X, Y, Z]: tissue intensities mixed by fraction, texture, bias field, Rician
    noise, skull-stripped."""
    shape = label.shape
    # tissue fractions: normal tissue outside the tumour, tumour tissue inside (soft edges)
    sig = 0.6 / sp
    fr = {
        t: ndimage.gaussian_filter((label == v).astype(np.float32), sig)
        for t, v in (("NCR", LABEL_NCR), ("ED", LABEL_ED), ("ET", LABEL_ET))
    }
    tumour = np.clip(fr["NCR"] + fr["ED"] + fr["ET"], 0, 1)
    # oedema keeps some underlying anatomy (it infiltrates), the core replaces it
    normal_w = 1.0 - tumour
    frac = {"WM": anatomy.wm * normal_w, "GM": anatomy.gm * normal_w, "CSF": anatomy.csf * normal_w, **fr}
    texture = 1.0 + 0.04 * _smooth_field(rng, [w / 40.0 for w in world], n_terms=8, max_freq=6.0)
    norm = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    ncoords = np.meshgrid(*norm, indexing="ij", sparse=True)
    image = np.zeros((4,) + shape, dtype=np.float32)
    for c, mod in enumerate(CHANNELS):
        rel_int = sum(TISSUE_INTENSITY[mod][i] * frac[t] for i, t in enumerate(_TISSUES))
        bias_field = np.exp(bias * _smooth_field(rng, ncoords, n_terms=4, max_freq=0.8))
        clean = BRAIN_LEVEL[mod] * rel_int * texture * bias_field
        sigma = noise * BRAIN_LEVEL[mod]
        n1 = rng.normal(0.0, sigma, shape).astype(np.float32)
        n2 = rng.normal(0.0, sigma, shape).astype(np.float32)
        image[c] = np.sqrt((clean + n1) ** 2 + n2**2) * anatomy.brain  # Rician magnitude, skull-stripped
    return image


#: file suffix per channel / label for each layout
_LAYOUT_FILES = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}


def default_case_id(seed: int, layout: str) -> str:
    """BraTS-style case identifier: 'Phantom_00007' (2017-2021) or 'Phantom-00007-000' (2023+)."""
    return f"Phantom_{seed:05d}" if layout == "brats2021" else f"Phantom-{seed:05d}-000"


def write_phantom_case(
    out_dir: PathLike,
    seed: int = 0,
    spacing_mm: float | Sequence[float] = 2.0,
    layout: str = "brats2021",
    case_id: str | None = None,
    *,
    orientation: str = "LPS",
    overwrite: bool = False,
) -> Path:
    """Generate a phantom and write it as a BraTS case folder ``out_dir/<case_id>/``.

    Images are int16 NIfTI (like BraTS), the label map uint8 with labels 1, 2, 4 ("brats2021": files
    ``<ID>_t1.nii.gz, _t1ce, _t2, _flair, _seg``) or 1, 2, 3 ("brats2023": ``<ID>-t1n, -t1c, -t2w, -t2f, -seg``).
    sform and qform codes are 1 (scanner). Each file is written atomically.

    Returns:
        The case folder.

    Raises:
        PhantomError: unknown layout; medcam.io.atomic.OutputExistsError: files exist and ``overwrite`` is False.
    """
    from medcam.io.atomic import atomic_write, check_output_path

    if layout not in _LAYOUT_FILES:
        raise PhantomError(f"layout must be one of {sorted(_LAYOUT_FILES)}, got {layout!r}.")
    cid = case_id or default_case_id(int(seed), layout)
    case_dir = Path(out_dir) / cid
    files = {k: case_dir / f"{cid}{s}.nii.gz" for k, s in _LAYOUT_FILES[layout].items()}
    for f in files.values():
        check_output_path(f, overwrite)
    ph = generate_phantom(seed=seed, spacing_mm=spacing_mm, orientation=orientation)
    label = ph.label.astype(np.uint8)
    if layout == "brats2023":
        label[label == LABEL_ET] = 3
    arrays = {m: np.clip(np.rint(ph.image[i]), 0, 32767).astype(np.int16) for i, m in enumerate(CHANNELS)}
    arrays["seg"] = label
    case_dir.mkdir(parents=True, exist_ok=True)
    for key, f in files.items():
        img = nib.Nifti1Image(arrays[key], ph.affine)
        img.set_sform(ph.affine, code=1)
        img.set_qform(ph.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        with atomic_write(f, overwrite=overwrite) as tmp:
            nib.save(img, str(tmp))
    logger.info("wrote phantom case %s (seed %d, %s mm, %s)", case_dir, seed, spacing_mm, layout)
    return case_dir
