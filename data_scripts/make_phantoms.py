#!/usr/bin/env python
"""Write N deterministic BraTS-like phantom cases (see medcam.data.phantoms).

Example::

    python data_scripts/make_phantoms.py out/phantoms -n 20 --layout brats2023 --spacing 2 --first-seed 100
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medcam.data.phantoms import write_phantom_case
from medcam.io.atomic import OutputExistsError

logger = logging.getLogger("make_phantoms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, help="folder that receives one sub-folder per case")
    ap.add_argument("-n", "--num-cases", type=int, default=1, help="number of cases (default 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="seed of the first case; case i uses first_seed + i")
    ap.add_argument(
        "--layout",
        choices=("brats2021", "brats2023"),
        default="brats2021",
        help="file naming and label convention (ET = 4 for brats2021, 3 for brats2023)",
    )
    ap.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (1.0 = template resolution)")
    ap.add_argument("--orientation", choices=("LPS", "RAS"), default="LPS", help="array axis orientation")
    ap.add_argument("--overwrite", action="store_true", help="replace existing case files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.num_cases < 1:
        ap.error("--num-cases must be >= 1")
    for i in range(args.num_cases):
        seed = args.first_seed + i
        try:
            path = write_phantom_case(
                args.out_dir,
                seed=seed,
                spacing_mm=args.spacing,
                layout=args.layout,
                orientation=args.orientation,
                overwrite=args.overwrite,
            )
        except OutputExistsError as exc:
            ap.exit(1, f"error: {exc}\n")
        logger.info("case %d/%d: %s", i + 1, args.num_cases, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
