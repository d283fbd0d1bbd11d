"""Benchmark: pairwise registration (step 12) against ground truth, and its speed and memory on a large canvas.

Accuracy, on the tiny phantom (``--seeds``, 5 slices each, ``T / dz = 15``; slices painted on a common canvas
at their stitched origin, as step 10 places them):

* z match: error of the best plane against 15 for the variants measured while choosing the method (plane 0
  alone, a mean image of the first planes, the per-plane mean with the band-pass) and for the full step;
* a rigid transform (2 degrees, (3, -2) px) injected into each moving slice: error of the recovered transform;
* an unrelated slice in a stack (speckle noise, a slice of another phantom): status and confidence of its pairs.

Speed and memory: ``--canvas`` (square, pixels) slices of ``--planes`` planes cut from one smooth random
volume, each with its own speckle, slice ``k`` moved by ``k * (1.5, -1)`` px (exact truth: plane 15 and a
translation of (-1.5, 1) px per pair), registered with 1 and 2 workers in fresh processes (seconds per pair,
peak RSS).

Usage::

    python benchmarks/bench_register.py --data /tmp/bench_register --seeds 0 1 2 --canvas 1024

Results are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def make_phantoms(data: Path, seeds) -> dict[int, Path]:
    from test_register import paint_common_space

    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition

    out = {}
    for seed in seeds:
        root = data / f"tiny-seed{seed}"
        common = root / "common"
        if not common.is_dir():
            acq = make_acquisition(root / "acq", preset="tiny", seed=seed, n_slices=5)
            preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
            rec = reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
            common.mkdir(parents=True)
            paint_common_space(rec.out_dir / "07_normalize", common)
        out[seed] = common
    return out


def z_variants(commons: dict[int, Path]) -> list[tuple[str, list[int]]]:
    """Best-plane errors (against 15) of the z-match variants, one per consecutive pair."""
    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.slices import find_slice_files
    from napari_soct.processing.stack import register as R

    variants = [("plane 0 alone, band-pass", 1, 4.0, "per-plane"),
                ("mean image of planes 0-2, no band-pass", 3, 0.0, "mean-image"),
                ("per-plane mean over 4 planes, band-pass", 4, 4.0, "per-plane"),
                ("per-plane mean over 6 planes, band-pass (default)", 6, 4.0, "per-plane"),
                ("per-plane mean over 8 planes, band-pass", 8, 4.0, "per-plane")]
    rows = []
    for name, n, background, kind in variants:
        params = replace(R.RegistrationParams(), z_match_planes=n, background_sigma_px=background)
        errors = []
        for common in commons.values():
            files = find_slice_files(common)
            for a, b in zip(sorted(files), sorted(files)[1:]):
                fixed = open_ome_zarr(files[a]).levels[0]
                top = np.asarray(open_ome_zarr(files[b]).levels[0][0:n], np.float32)
                valid = top > 0
                roi = R._centre_roi(valid.any(0) & (np.asarray(fixed[15]) > 0), params.roi_fraction)
                candidates = list(range(10, 21))
                if kind == "mean-image":
                    mean, v = R._mean_planes(top)
                    scores = {}
                    for q in candidates:
                        fm, fv = R._mean_planes(np.asarray(fixed[q:q + n], np.float32))
                        scores[q] = R.pearson_ncc(fm[roi], mean[roi], (fv & v)[roi])
                else:
                    scores, _ = R._z_scores(fixed, top, valid, candidates, roi, params, 100)
                best, _, _ = R._peak(scores, params.z_prominence_full)
                errors.append(best - 15)
        rows.append((name, errors))
    return rows


def injected(commons: dict[int, Path], tmp: Path):
    """Recovered minus injected transform per pair (and the step's z match), full step on two-slice folders."""
    import shutil

    from test_register import _apply_to_planes, write_slice

    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.slices import find_slice_files
    from napari_soct.processing.stack.register import RegistrationParams, register_pairwise
    from napari_soct.processing.stack.transforms import PairTransform

    rows = []
    for seed, common in commons.items():
        files = find_slice_files(common)
        for a, b in zip(sorted(files), sorted(files)[1:]):
            image = open_ome_zarr(files[b])
            _, ny, nx = image.shape
            truth = PairTransform(a, b, rotation_deg=2.0, tx_px=3.0, ty_px=-2.0, center_x_px=nx / 2,
                                  center_y_px=ny / 2)
            folder = tmp / f"inj-{seed}-{a}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            shutil.copytree(files[a], folder / files[a].name)
            write_slice(folder / files[b].name, _apply_to_planes(np.asarray(image.levels[0][...]), truth),
                        image.scales_mm[0], image.attributes["soct"])
            plain = register_pairwise(common, tmp / f"plain-{seed}", replace(RegistrationParams(),
                                                                              if_exists="skip"))
            result = register_pairwise(folder, tmp / f"reg-{seed}-{a}", replace(RegistrationParams(),
                                                                               if_exists="overwrite"))
            (pair,) = result.pairs
            c = np.array([[pair.center_x_px, pair.center_y_px]])
            shift = truth.apply(c)[0] - c[0]
            base = plain.pairs[a]
            rows.append({"pair": f"seed {seed}: {a}->{b}", "status": pair.status, "z": pair.z_match_plane,
                         "z_plain": base.z_match_plane, "rot_err": pair.rotation_deg - 2.0,
                         "shift_err": math.hypot(pair.tx_px - shift[0], pair.ty_px - shift[1]),
                         "plain_rot": base.rotation_deg, "plain_shift": math.hypot(base.tx_px, base.ty_px),
                         "confidence": pair.confidence, "plain_conf": base.confidence})
    return rows


def unrelated(commons: dict[int, Path], tmp: Path):
    """Slice 2 of the first phantom replaced by noise or by slice 2 of another phantom; the 5-slice stack is
    registered: status and confidence of the pairs 1->2 and 2->3 (the stack's gate sees all four pairs)."""
    import shutil

    from test_register import write_slice

    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.slices import find_slice_files
    from napari_soct.processing.stack.register import RegistrationParams, register_pairwise

    seeds = list(commons)
    files = find_slice_files(commons[seeds[0]])
    other = find_slice_files(commons[seeds[1 % len(seeds)]])
    image = open_ome_zarr(files[2])
    data = np.asarray(image.levels[0][...])
    rng = np.random.default_rng(1)
    noise = ((rng.gamma(2.0, 0.25, data.shape) + 1e-3) * (data > 0)).astype(np.float32)
    foreign = np.zeros_like(data)
    o = np.asarray(open_ome_zarr(other[2]).levels[0][...])
    h, w = min(o.shape[1], data.shape[1]), min(o.shape[2], data.shape[2])
    foreign[:, :h, :w] = o[: data.shape[0], :h, :w]
    rows = []
    for name, moving in (("speckle noise", noise), (f"slice 2 of phantom seed {seeds[1 % len(seeds)]}", foreign)):
        for transform in ("euler", "translation"):
            folder = tmp / f"unrelated-{len(rows)}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for sid, path in files.items():
                if sid != 2:
                    shutil.copytree(path, folder / path.name)
            write_slice(folder / files[2].name, moving, image.scales_mm[0], image.attributes["soct"])
            result = register_pairwise(folder, tmp / f"u-reg-{len(rows)}", replace(
                RegistrationParams(), transform=transform, if_exists="overwrite"))
            for pair in result.pairs[1:3]:
                rows.append((name, transform, f"{pair.fixed_id}->{pair.moving_id}", pair.status, pair.z_match_ncc,
                             pair.confidence, result.z_match_gate))
    return rows


SHIFT_PER_SLICE = (1.5, -1.0)  # (x, y) px: slice k is moved by k times this, so every pair's truth is (-1.5, 1)


def make_large(tmp: Path, canvas: int, planes: int) -> Path:
    """Three slices cut from one smooth random volume, consecutive slices 15 planes apart, slice ``k`` moved by
    ``k * SHIFT_PER_SLICE`` and given its own speckle (exact truth: plane 15, translation (-1.5, 1) px)."""
    from scipy.ndimage import gaussian_filter, shift

    from test_register import write_slice

    folder = tmp / f"large-{canvas}-{planes}-v2"
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    depth = planes + 2 * 15
    volume = np.empty((depth, canvas, canvas), np.float32)
    for z in range(depth):
        volume[z] = gaussian_filter(rng.random((canvas, canvas), np.float32), 3)
    volume = gaussian_filter(volume, (1.5, 0, 0))
    volume = (volume - volume.min()) / np.ptp(volume) + 0.05
    for k in range(3):
        data = np.empty((planes, canvas, canvas), np.float32)
        for p in range(planes):
            moved = shift(volume[15 * k + p], (k * SHIFT_PER_SLICE[1], k * SHIFT_PER_SLICE[0]), order=1)
            data[p] = np.maximum(moved, 0.01) * rng.gamma(4.0, 0.25, (canvas, canvas)).astype(np.float32)
        soct = {"slice_id": k, "voxel_size_um": [10.0, 10.0, 10.0], "origin_mm": [0.0, 0.0],
                "canvas_origin_mm": [0.0, 0.0], "stage_z_mm": 5.0 + 0.15 * k, "offset_px": [0, 0]}
        write_slice(folder / f"slice_z{k:02d}_common.ome.zarr", data, (0.01,) * 3, soct)
    return folder


def child(folder: str, out: str, workers: int) -> None:
    from napari_soct.processing.stack.register import RegistrationParams, register_pairwise

    started = time.perf_counter()
    result = register_pairwise(folder, out, RegistrationParams(workers=workers, if_exists="overwrite",
                                                               memory_budget_gb=8.0))
    seconds = time.perf_counter() - started
    truth = (-SHIFT_PER_SLICE[0], -SHIFT_PER_SLICE[1])
    print(json.dumps({"seconds": seconds, "pairs": len(result.pairs),
                      "z": [p.z_match_plane for p in result.pairs], "status": [p.status for p in result.pairs],
                      "shift": max(math.hypot(p.tx_px - truth[0], p.ty_px - truth[1]) for p in result.pairs),
                      "rotation": max(abs(p.rotation_deg) for p in result.pairs),
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/bench_register"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--canvas", type=int, default=1024)
    parser.add_argument("--planes", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    args.data.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU(s); "
          f"python {platform.python_version()}\n")
    commons = make_phantoms(args.data, args.seeds)

    print("### Z match on the tiny phantom (error of the best plane against T/dz = 15)\n")
    print("| variant | errors per pair | max abs | mean abs |\n|---|---|---:|---:|")
    for name, errors in z_variants(commons):
        e = np.abs(errors)
        print(f"| {name} | {' '.join(map(str, errors))} | {e.max()} | {e.mean():.2f} |")

    rows = injected(commons, args.data / "runs")
    print("\n### Injected rigid transform (2 deg, (3, -2) px) recovered by the step (file convention)\n")
    print("| pair | status | z (plain) | rotation error deg | shift error px | confidence | plain pair: rotation "
          "deg, shift px, confidence |\n|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['status']} | {r['z']} ({r['z_plain']}) | {r['rot_err']:+.2f} | "
              f"{r['shift_err']:.2f} | {r['confidence']:.2f} | {r['plain_rot']:+.2f}, {r['plain_shift']:.2f}, "
              f"{r['plain_conf']:.2f} |")
    rot = np.abs([r["rot_err"] for r in rows])
    shift = np.array([r["shift_err"] for r in rows])
    print(f"\nall pairs: rotation error median {np.median(rot):.2f}, max {rot.max():.2f} deg; shift error median "
          f"{np.median(shift):.2f}, max {shift.max():.2f} px; z within 1 of 15: "
          f"{sum(abs(r['z'] - 15) <= 1 for r in rows)}/{len(rows)} (plain pairs "
          f"{sum(abs(r['z_plain'] - 15) <= 1 for r in rows)}/{len(rows)})")

    print("\n### Unrelated slice in a 5-slice stack\n\n| slice 2 replaced by | transform | pair | status | z-match NCC "
          "| confidence | stack gate |\n|---|---|---|---|---:|---:|---:|")
    for name, transform, pair, status, z_ncc, conf, gate in unrelated(commons, args.data / "runs"):
        print(f"| {name} | {transform} | {pair} | {status} | {z_ncc:.3f} | {conf:.3f} | {gate:.3f} |")

    folder = make_large(args.data, args.canvas, args.planes)
    print(f"\n### Speed and memory: 3 slices of {args.planes} x {args.canvas} x {args.canvas} (2 pairs), fresh "
          f"process per run, median of {args.repeats}\n")
    print("| workers | seconds per pair | peak RSS MB | z planes (truth 15) | status | max shift error px | max "
          "rotation deg (truth 0) |\n|---:|---:|---:|---|---|---:|---:|")
    for workers in (1, 2):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(args.data / "large-reg"),
                                  str(workers)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        print(f"| {workers} | {median['seconds'] / median['pairs']:.2f} | {max(r['max_rss_mb'] for r in runs):.0f} | "
              f"{median['z']} | {', '.join(median['status'])} | {median['shift']:.3f} | {median['rotation']:.3f} |")


if __name__ == "__main__":
    main()
