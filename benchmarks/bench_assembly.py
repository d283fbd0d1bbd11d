"""Benchmark: ``reconstruct`` on the bench phantom, the final volume measured against the phantom's truth.

Runs :func:`napari_soct.pipeline.reconstruct.reconstruct` (steps 1-14 and the report, default parameters) on the
mosaic grids of the bench acquisition, then measures the stacked volume against the truth with
:mod:`napari_soct.processing.synthetic.evaluate` (the same code as ``tests/test_assembly_truth.py`` on tiny):

* per pyramid level: NCC over tissue against the truth averaged onto the level's grid (every voxel with data,
  as the test does, and only voxels whose whole box has data: at the border of the data a coarse voxel averages
  data with "no data" zeros), next to the ceiling the phantom's speckle alone allows (truth times one speckle
  realisation, averaged the same way, same voxels);
* per slice: XY placement error (sub-pixel phase correlation of the depth-averaged section against the truth) and
  the drift over the stack (last slice's error minus the first's);
* per pair: z-overlap error (plane used by the stacking minus ``T / dz``);
* the re-homing report's verdict per consecutive pair, next to what the phantom injected.

Each stage's wall time comes from the chain (``StageOutcome.seconds``; a stage kept from an earlier run into the
same ``--out`` shows the seconds recorded in ``OUT/.soct/<step>.json``); peak RSS per stage is sampled every
0.2 s from ``/proc/self/status`` (one process: the reconstruction, then the evaluation).

Usage::

    python benchmarks/bench_assembly.py [--acq bench_data/bench-seed0] [--mosaic bench_data/bench-chain/preprocess]
        [--out bench_data/bench-assembly] [--workers 2] [--memory-budget-gb 4]

Re-running into the same ``--out`` keeps the finished stages (the chain's records) and only measures again. The
figures and timings are also written to ``OUT/bench_assembly.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class RssSampler:
    """Peak resident memory (MiB) per labelled phase, sampled from ``/proc/self/status`` in a thread."""

    def __init__(self, interval: float = 0.2):
        self.label = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            rss, label = self.rss_mib(), self.label
            self.peaks[label] = max(self.peaks.get(label, 0.0), rss)
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acq", type=Path, default=Path("bench_data/bench-seed0"),
                        help="the synthetic acquisition (raw/ and truth/), opened with SyntheticAcquisition.load")
    parser.add_argument("--mosaic", type=Path, default=Path("bench_data/bench-chain/preprocess"),
                        help="its preprocessed mosaic grids (with shifts_xy.csv and slice_config.csv)")
    parser.add_argument("--out", type=Path, default=Path("bench_data/bench-assembly"),
                        help="reconstruction folder (an earlier run there is resumed, finished stages kept)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rerun-from", default=None,
                        help="recompute from this step on (e.g. 'stack' after a change to stacking)")
    parser.add_argument("--memory-budget-gb", type=float, default=4.0)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the truth sampled on the volume grid is kept during the run (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--max-level-um", type=float, default=float("inf"),
                        help="compare levels up to this voxel size only (default: all)")
    args = parser.parse_args()

    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.synthetic import (SyntheticAcquisition, TruthOnVolumeGrid, level_ncc,
                                                  placement_drift_px, slice_placement_errors, z_overlap_errors)

    acq = SyntheticAcquisition.load(args.acq)
    c = acq.config
    params = ReconstructParams(workers=args.workers, memory_budget_gb=args.memory_budget_gb)
    figures: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
                                f"numpy {np.__version__}",
                     "load_before": os.getloadavg()}

    with RssSampler() as rss:
        # ------------------------------------------------------------------ reconstruction
        current = {"i": -1}

        def progress(done, total, message=""):
            i = int(done // 1000)
            if i != current["i"]:
                current["i"] = i
                rss.label = f"stage {i}"
                print(f"[{time.strftime('%H:%M:%S')}] {done}/{total} {message}", file=sys.stderr, flush=True)

        rss.label = "stage 0"
        started = time.perf_counter()
        result = reconstruct(args.mosaic, args.out, params, progress=progress, rerun_from=args.rerun_from)
        chain_seconds = time.perf_counter() - started
        figures["load_after_reconstruct"] = os.getloadavg()
        stages = []
        for i, o in enumerate(result.outcomes):
            seconds = o.seconds
            if o.action == "kept":
                record = args.out / ".soct" / f"{o.step}.json"
                seconds = json.loads(record.read_text()).get("seconds", float("nan")) if record.is_file() \
                    else float("nan")
            stages.append({"step": o.step, "action": o.action, "seconds": seconds,
                           "peak_rss_mib": rss.peaks.get(f"stage {i}") if o.action != "kept" else None})

        # ------------------------------------------------------------------ evaluation
        image = open_ome_zarr(result.volume)
        evaluation = []
        with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
            truth = TruthOnVolumeGrid(acq, image, cache=Path(tmp) / "truth_on_volume_grid.zarr")
            levels = []
            for level in range(len(image.levels)):
                voxel = [round(v * 1e3, 3) for v in image.scales_mm[level][-3:]]
                if max(voxel) > args.max_level_um:
                    break
                rss.label = f"level {level}"
                t0 = time.perf_counter()
                f = level_ncc(acq, image, level, truth=truth, speckle_ceiling=True, min_coverage=0.99)
                seconds = time.perf_counter() - t0
                evaluation.append((f"NCC level {level} ({' x '.join(f'{v:g}' for v in voxel)} um)", seconds,
                                   rss.peaks.get(f"level {level}")))
                levels.append({"level": level, "voxel_um": voxel, "shape": list(image.levels[level].shape),
                               "ncc": f.ncc, "speckle_ceiling": f.speckle_ceiling, "n_voxels": f.n_voxels,
                               "ncc_covered": f.ncc_covered, "n_covered": f.n_covered})
                print(f"level {level} {voxel}: ncc {f.ncc:.3f} (covered {f.ncc_covered:.3f}) ceiling "
                      f"{f.speckle_ceiling:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
            rss.label = "placement"
            t0 = time.perf_counter()
            placement = slice_placement_errors(acq, image, truth=truth)
            evaluation.append(("placement per slice", time.perf_counter() - t0, rss.peaks.get("placement")))
        rss.label = "end"

    z_errors = z_overlap_errors(acq, Path(result.volume).parent / "z_matches.csv")
    drift = placement_drift_px(placement)
    report_path = args.out / "09_rehoming" / "rehoming_report.json"
    verdicts = []
    if report_path.is_file():
        g, r = c.encoder_glitch_slice, c.rehoming_slice
        for s in json.loads(report_path.read_text())["steps"]:
            pair = (s["fixed_id"], s["moving_id"])
            # a glitch moves one slice's reported position: the steps into and out of it; a re-homing one step
            injected = ("glitch (slice %d)" % g if g is not None and g in pair
                        else "re-homing (slice %d on)" % r if r is not None and pair[1] == r else "none")
            verdicts.append({"pair": f"{pair[0]}-{pair[1]}", "kind": s["kind"], "reliable": s.get("reliable"),
                             "injected": injected})
    soct = image.attributes.get("soct", image.attributes)
    figures.update({
        "acq": str(args.acq), "mosaic": str(args.mosaic), "out": str(args.out), "volume": str(result.volume),
        "workers": args.workers, "memory_budget_gb": args.memory_budget_gb, "chain_seconds": chain_seconds,
        "stages": stages, "evaluation": [{"what": w, "seconds": s, "peak_rss_mib": r} for w, s, r in evaluation],
        "levels": levels, "placement_px": {str(k): v for k, v in placement.items()}, "drift_px": drift,
        "z_overlap_errors": {f"{a}-{b}": e for (a, b), e in z_errors.items()}, "rehoming": verdicts,
        "slice_z0": soct.get("slice_z0"), "load_after": os.getloadavg(),
        "injected": {"encoder_glitch_slice": c.encoder_glitch_slice, "rehoming_slice": c.rehoming_slice},
    })
    (args.out / "bench_assembly.json").write_text(json.dumps(figures, indent=1, default=float))

    # ---------------------------------------------------------------------- Markdown
    print(f"\nmachine: {figures['machine']}; load average before {figures['load_before'][0]:.1f}, "
          f"after {figures['load_after'][0]:.1f}")
    print(f"acquisition {args.acq} (preset {c.preset}, seed {c.seed}, slices {acq.slice_ids}, "
          f"voxel {acq.voxel_size_um} um, T = {c.slice_thickness_um:g} um); volume {result.volume}, "
          f"shape {list(image.levels[0].shape)}; workers {args.workers}, budget {args.memory_budget_gb:g} GiB\n")
    print("| stage | action | seconds | peak RSS MiB |\n|---|---|---:|---:|")
    for s in stages:
        print(f"| {s['step']} | {s['action']} | {_fmt(s['seconds'], 1)} | {_fmt(s['peak_rss_mib'], 0)} |")
    chain_peak = max(rss.peaks.get(f"stage {i}", 0.0) for i in range(len(stages)))
    print(f"| **chain (this run)** | | {chain_seconds:.1f} | {_fmt(chain_peak, 0)} |")
    for what, seconds, peak in evaluation:
        print(f"| evaluation: {what} | | {seconds:.1f} | {_fmt(peak, 0)} |")
    print("\n| level | voxel um (z, y, x) | shape | NCC over tissue | voxels | NCC, voxels wholly with data | voxels "
          "| speckle-only ceiling |\n|---|---|---|---:|---:|---:|---:|---:|")
    for lv in levels:
        print(f"| {lv['level']} | {' x '.join(f'{v:g}' for v in lv['voxel_um'])} | {lv['shape']} | "
              f"{_fmt(lv['ncc'])} | {lv['n_voxels']} | {_fmt(lv['ncc_covered'])} | {lv['n_covered']} | "
              f"{_fmt(lv['speckle_ceiling'])} |")
    print("\n| slice | first plane | placement error dy, dx (px) | norm (px) |\n|---|---:|---|---:|")
    z0s = {int(k): int(v) for k, v in (soct.get("slice_z0") or {}).items()}
    for sid in sorted(placement):
        dy, dx = placement[sid]
        print(f"| {sid} | {z0s.get(sid, '-')} | {dy:+.2f}, {dx:+.2f} | {np.hypot(dy, dx):.2f} |")
    print(f"\ndrift over the stack (last slice's error minus the first's): {drift:.2f} px")
    expected = c.slice_thickness_um / c.axial_resolution_um
    print(f"\n| pair | z overlap used - true ({expected:.2f} planes per cut) |\n|---|---:|")
    for (a, b), e in z_errors.items():
        print(f"| {a}-{b} | {e:+.2f} |")
    print("\n| pair | re-homing verdict | reliable | injected |\n|---|---|---|---|")
    for v in verdicts:
        print(f"| {v['pair']} | {v['kind']} | {v['reliable']} | {v['injected']} |")
    if c.encoder_glitch_slice is None and c.rehoming_slice is None:
        print("\n(this phantom has no injected encoder glitch nor re-homing: the verdicts can only show that "
              "ordinary steps are not taken for either)")


if __name__ == "__main__":
    main()
