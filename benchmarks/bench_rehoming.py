"""Benchmark: step 9 (re-homing detection) on the bench phantom with an injected encoder glitch and re-homing.

Generates the bench acquisition with an encoder glitch on slice 2 (a reported jump of the stage that the next
slice cancels; the true position does not move) and a re-homing from slice 4 (true and reported positions
jump), preprocesses it into ``shifts_xy.csv`` and runs :func:`detect_rehoming`; prints each transition's verdict
next to what was injected.

Usage::

    python benchmarks/bench_rehoming.py --out bench_data/bench-glitch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_data/bench-glitch"))
    parser.add_argument("--glitch-slice", type=int, default=2)
    parser.add_argument("--rehoming-slice", type=int, default=4)
    args = parser.parse_args()
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.stack.rehoming import detect_rehoming
    from napari_soct.processing.synthetic import make_acquisition

    start = time.perf_counter()
    acq = make_acquisition(args.out / "acq", preset="bench", seed=0, encoder_glitch_slice=args.glitch_slice,
                           rehoming_slice=args.rehoming_slice)
    generated = time.perf_counter() - start
    preprocess_acquisition(acq.raw_dir, args.out / "mosaic", generate_previews=False, exclude_first_slices=0)
    preprocessed = time.perf_counter() - start - generated
    detect_rehoming(args.out / "mosaic" / "shifts_xy.csv", args.out / "rehoming")
    report = json.loads((args.out / "rehoming" / "rehoming_report.json").read_text())
    print(f"generated {generated:.0f} s, preprocessed {preprocessed:.0f} s; injected: encoder glitch on slice "
          f"{acq.config.encoder_glitch_slice}, re-homing from slice {acq.config.rehoming_slice}\n")
    print("| pair | reported shift (mm, x, y) | verdict | cleaned shift (mm) | reliable |")
    print("|---|---|---|---|---|")
    for s in report["steps"]:
        x, y = s["original_mm"]
        cx, cy = s["cleaned_mm"]
        cleaned = "kept" if (cx, cy) == (x, y) else f"{cx:+.4f}, {cy:+.4f}"
        print(f"| {s['fixed_id']}-{s['moving_id']} | {x:+.4f}, {y:+.4f} | {s['kind']} | {cleaned} | "
              f"{'yes' if s['reliable'] else 'no'} |")


if __name__ == "__main__":
    main()
