"""Accuracy and time of tissue segmentation, pixel-size estimation and H&E <-> DAPI registration on real data.

- Tissue (threshold method, no weights): F1 of the per-spot in-tissue flags (spot disk at least half on tissue)
  against Space Ranger's ``in_tissue`` on the perik CytAssist sample (its 600 px lowres image, and Space Ranger's
  3000 px ``detected_tissue_image.jpg`` read at 1/4) and against the ST spot detector's ``selected`` spots on the
  MOB1 and MOB2 sections (1905 px JPGs, full resolution), with the seconds the segmentation takes.
- Pixel size: the lattice estimate against 65 um / ``spot_diameter_fullres`` and 105 um /
  ``fiducial_diameter_fullres`` (Visium: scanpy 1.0.0, SFE 2.x, perik CytAssist), against the ST converter's fit and
  between the two MOB sections, and against ``microns_per_pixel`` (Visium HD, VisiumIO).
- Registration: the real SFE Xenium morphology image (237 x 237 px) against a pseudo-H&E made from it and warped
  by a random affine (``simulate_he_from_dapi``; no paired real H&E exists in the data), 10 seeds, with the SIFT
  match on the full image (``coarse_max_side=512``) and on halved images (``coarse_max_side=128``): largest error
  over a 9 x 9 grid of DAPI points (corners included), residual and seconds.

Run: ``python benchmarks/tissue_and_registration.py`` (writes ``benchmarks/results/tissue_and_registration.json``).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

import hest_zarr
from hest_zarr.converters.st_v1 import read_st_v1
from hest_zarr.converters.visium_hd import read_visium_hd
from hest_zarr.ops.pixel_size import fit_pixel_size, visium_lattice_um
from hest_zarr.ops.register import register_he_to_dapi, simulate_he_from_dapi
from hest_zarr.ops.tissue import f1_score, spot_tissue_fraction
from hest_zarr.ops.tissue_mask import segment_tissue
from hest_zarr.workflows.pixel_size import estimate_pixel_size

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "tissue_and_registration.json"
PERIK = DATA / "perik_visium_cytassist_mouse_placenta"
ST = DATA / "STUtility_ST_v1"
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
SEEDS = range(10)


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tissue_case(image: np.ndarray, centres: np.ndarray, radius: float, truth: np.ndarray) -> dict:
    start = time.perf_counter()
    mask = segment_tissue(image).mask
    seconds = time.perf_counter() - start
    flags = spot_tissue_fraction(mask, centres, np.full(len(centres), radius)) >= 0.5
    return {
        "image_px": list(image.shape[:2]),
        "spots": len(truth),
        "spots_in_tissue_truth": int(truth.sum()),
        "f1": f1_score(flags, truth),
        "false_positives": int((flags & ~truth).sum()),
        "false_negatives": int((~flags & truth).sum()),
        "seconds": seconds,
    }


def tissue_benchmark() -> dict:
    positions = pd.read_csv(PERIK / "spatial" / "tissue_positions.csv")
    factors = json.loads((PERIK / "spatial" / "scalefactors_json.json").read_text())
    centres = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    truth = positions["in_tissue"].to_numpy(bool)
    # the 55 um capture spot, at the lattice pixel size (= 105 um / fiducial_diameter_fullres on this sample)
    radius = factors["fiducial_diameter_fullres"] / 105 * 55 / 2
    lowres = factors["tissue_lowres_scalef"]
    cases = {
        "perik_lowres": tissue_case(
            rgb(PERIK / "spatial" / "tissue_lowres_image.png"), centres * lowres, radius * lowres, truth
        ),
        "perik_detected_tissue_image_quarter": tissue_case(
            rgb(PERIK / "spatial" / "detected_tissue_image.jpg")[::4, ::4], centres / 4, radius / 4, truth
        ),
    }
    for section in ("MOB1", "MOB2"):
        table = pd.read_csv(ST / f"alignment_table_{section}.tsv", sep="\t")
        cases[section] = tissue_case(
            rgb(ST / f"{section}.jpg"),
            table[["pixel_x", "pixel_y"]].to_numpy(np.float64),
            50 / 4.385,  # 100 um spots at the sections' 4.385 um/px
            table["selected"].to_numpy(bool),
        )
    return cases


def visium_pixel_size(spatial: Path) -> dict:
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    positions = pd.read_csv(new) if new.exists() else pd.read_csv(old, header=None, names=POSITION_COLUMNS)
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    start = time.perf_counter()
    estimate = fit_pixel_size(
        positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64),
        visium_lattice_um(positions["array_row"], positions["array_col"]),
    )
    seconds = time.perf_counter() - start
    from_spot = 65.0 / factors["spot_diameter_fullres"]
    from_fiducial = 105.0 / factors["fiducial_diameter_fullres"]
    return {
        "spots": estimate.n_spots,
        "estimate_um": estimate.pixel_size_um,
        "uncertainty_um": estimate.uncertainty_um,
        "from_spot_diameter_um": from_spot,
        "difference_vs_spot_diameter_percent": 100 * (estimate.pixel_size_um / from_spot - 1),
        "from_fiducial_diameter_um": from_fiducial,
        "difference_vs_fiducial_diameter_percent": 100 * (estimate.pixel_size_um / from_fiducial - 1),
        "seconds": seconds,
    }


def store_pixel_size(url: str) -> dict:
    start = time.perf_counter()
    report = estimate_pixel_size(url, write=False)
    return {
        "spots": report.estimate.n_spots,
        "estimate_um": report.estimate.pixel_size_um,
        "uncertainty_um": report.estimate.uncertainty_um,
        "anisotropy": max(report.estimate.pixel_size_um_xy) / min(report.estimate.pixel_size_um_xy),
        "store_um": report.references["store"],
        "difference_vs_store_percent": 100 * report.differences["store"],
        "seconds_with_store_read": time.perf_counter() - start,
    }


def pixel_size_benchmark(tmp: Path) -> dict:
    warnings.filterwarnings("ignore", category=UserWarning)  # zarr and spatialdata notes while writing the stores
    results = {
        "scanpy_visium_1.0.0": visium_pixel_size(DATA / "scanpy" / "visium_data" / "1.0.0" / "spatial"),
        "sfe_visium_v2_sample01": visium_pixel_size(DATA / "SFE" / "visium_v2_sample01" / "outs" / "spatial"),
        "perik_cytassist": visium_pixel_size(PERIK / "spatial"),
    }
    for section in ("MOB1", "MOB2"):
        sample = read_st_v1(ST / f"{section}.tsv", alignment=ST / f"alignment_table_{section}.tsv")
        results[section] = store_pixel_size(hest_zarr.write(sample, tmp / f"{section}.zarr"))
    results["MOB1_vs_MOB2_percent"] = 100 * (results["MOB1"]["estimate_um"] / results["MOB2"]["estimate_um"] - 1)
    hd_root = DATA / "VisiumIO_visiumhd"
    hd = store_pixel_size(hest_zarr.write(read_visium_hd(hd_root), tmp / "hd.zarr"))
    factors_path = hd_root / "binned_outputs" / "square_002um" / "spatial" / "scalefactors_json.json"
    factors = json.loads(factors_path.read_text())
    hd["microns_per_pixel"] = factors["microns_per_pixel"]
    hd["difference_vs_microns_per_pixel_percent"] = 100 * (hd["estimate_um"] / factors["microns_per_pixel"] - 1)
    results["visium_hd_VisiumIO_002um"] = hd
    return results


def grid_error_px(found: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> float:
    gy, gx = np.meshgrid(np.linspace(0, shape[0], 9), np.linspace(0, shape[1], 9), indexing="ij")
    dapi_points = np.c_[gx.ravel(), gy.ravel(), np.ones(gx.size)]
    he_points = dapi_points @ np.linalg.inv(truth).T
    return float(np.hypot(*((he_points @ found.T) - dapi_points)[:, :2].T).max())


def registration_benchmark() -> dict:
    dapi = tifffile.imread(DATA / "SFE" / "xenium" / "morphology_focus.ome.tif")
    results: dict = {}
    for coarse_max_side in (512, 128):
        runs = []
        for seed in SEEDS:
            he, truth = simulate_he_from_dapi(dapi, seed)
            start = time.perf_counter()
            found = register_he_to_dapi(he, dapi, coarse_max_side=coarse_max_side)
            runs.append(
                {
                    "seed": seed,
                    "he_px": list(he.shape[:2]),
                    "max_grid_error_px": grid_error_px(found.affine, truth, dapi.shape),
                    "residual_px": found.residual_px,
                    "inliers": found.n_inliers,
                    "seconds": time.perf_counter() - start,
                }
            )
        results[f"coarse_max_side_{coarse_max_side}"] = {
            "runs": runs,
            "worst_error_px": max(run["max_grid_error_px"] for run in runs),
            "median_seconds": float(np.median([run["seconds"] for run in runs])),
        }
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": {"python": sys.version.split()[0], "processor": platform.processor() or platform.machine()},
            "tissue": tissue_benchmark(),
            "pixel_size": pixel_size_benchmark(Path(tmp)),
            "registration": registration_benchmark(),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("tissue (threshold): F1 of per-spot flags, seconds")
    for name, case in results["tissue"].items():
        print(
            f"  {name:38s} F1 {case['f1']:.4f}  FP {case['false_positives']:3d}  FN {case['false_negatives']:3d}"
            f"  {case['seconds']:.2f} s  ({case['image_px'][1]} x {case['image_px'][0]} px)"
        )
    print("pixel size (um/px)")
    for name, entry in results["pixel_size"].items():
        if not isinstance(entry, dict):
            print(f"  {name:38s} {entry:+.3f} %")
        elif "from_spot_diameter_um" in entry:
            print(
                f"  {name:38s} {entry['estimate_um']:.5f}  vs 65/spot_diameter "
                f"{entry['difference_vs_spot_diameter_percent']:+.3f} %, vs 105/fiducial_diameter "
                f"{entry['difference_vs_fiducial_diameter_percent']:+.3f} %"
            )
        else:
            print(f"  {name:38s} {entry['estimate_um']:.5f}  vs store {entry['difference_vs_store_percent']:+.3f} %")
    print("registration (pseudo-H&E from the real DAPI, random affines)")
    for name, entry in results["registration"].items():
        errors = ", ".join(f"{run['max_grid_error_px']:.2f}" for run in entry["runs"])
        print(f"  {name}: max grid error px per seed [{errors}], median {entry['median_seconds']:.2f} s")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
