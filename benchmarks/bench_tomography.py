"""Benchmark: radon, filtered back projection and SART against scikit-image, side by side in one process; a
stack of sinograms larger than the memory budget, peak RSS measured in a fresh process.

Measures:

* speed (median of ``--repeats`` runs, alternating scikit-image and ours): FBP (ramp) and radon at 512 x 512
  with 512 angles, SART per iteration on the 400 x 400 phantom with 180 angles; ratios scikit-image / ours;
* accuracy on scikit-image's Shepp-Logan phantom (400 x 400, 180 angles, noiseless): RMSE against the phantom
  of every filter and of SART after 1 and 2 iterations, ours and scikit-image's on the same sinogram
  (scikit-image's ``radon``), and ours on our own sinogram;
* memory: ``--stack`` sinograms (slice, detector, angle) reconstructed by the FBP step with
  ``--budget-mib``, in a child process: peak resident memory (``ru_maxrss``) above the process after imports.

Usage::

    python benchmarks/bench_tomography.py --repeats 5 --data /tmp/bench_tomography

Prints Markdown tables (the ones in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _median_time(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - b) ** 2)))


def bench_speed(repeats: int, threads: int) -> list[dict]:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import iradon as sk_iradon
    from skimage.transform import iradon_sart as sk_sart
    from skimage.transform import radon as sk_radon
    from skimage.transform import rescale

    from napari_soct.processing.tomography import iradon, iradon_sart, radon
    from napari_soct.processing.tomography.sart import SartGeometry

    rows = []
    big = rescale(shepp_logan_phantom(), 512 / 400, order=1)  # 512 x 512, zero outside the circle
    theta = np.linspace(0.0, 180.0, 512, endpoint=False)
    sino = sk_radon(big, theta)
    from napari_soct.processing._jit import warm_up

    def numpy_path(function):  # our numpy code, the numba kernels turned off
        def run():
            before = os.environ.get("NAPARI_SOCT_JIT")
            os.environ["NAPARI_SOCT_JIT"] = "0"
            try:
                return function()
            finally:
                if before is None:
                    os.environ.pop("NAPARI_SOCT_JIT")
                else:
                    os.environ["NAPARI_SOCT_JIT"] = before
        return run

    kernels = warm_up()  # compile or load the numba kernels before any timing
    fbp = "FBP (ramp), 512 x 512, 512 angles"
    cases = [
        (fbp + (", numba kernel" if kernels else ""), lambda: sk_iradon(sino, theta),
         lambda: iradon(sino, theta, threads=threads), lambda r: _rmse(r, big)),
    ]
    if kernels:
        cases.append((fbp + ", numpy path", lambda: sk_iradon(sino, theta),
                      numpy_path(lambda: iradon(sino, theta, threads=threads)), lambda r: _rmse(r, big)))
    cases += [
        ("radon, 512 x 512, 512 angles", lambda: sk_radon(big, theta), lambda: radon(big, theta, threads=threads),
         None),
    ]
    small = shepp_logan_phantom()
    theta_s = np.linspace(0.0, 180.0, 180, endpoint=False)
    sino_s = sk_radon(small, theta_s)
    start = time.perf_counter()
    geometry = SartGeometry(400, theta_s)
    setup = time.perf_counter() - start
    sart = "SART, one iteration, 400 x 400, 180 angles"
    cases.append((sart + (", numba kernels" if kernels else ""), lambda: sk_sart(sino_s, theta_s),
                  lambda: iradon_sart(sino_s, theta_s, geometry=geometry), lambda r: _rmse(r, small)))
    if kernels:
        cases.append((sart + ", numpy path", lambda: sk_sart(sino_s, theta_s),
                      numpy_path(lambda: iradon_sart(sino_s, theta_s, geometry=geometry)), lambda r: _rmse(r, small)))
    for name, theirs, ours, error in cases:
        t_theirs, t_ours, c_theirs, c_ours, r_theirs, r_ours = [], [], [], [], None, None
        for _ in range(repeats):  # alternate, so both see the same machine load
            start, cpu = time.perf_counter(), time.process_time()
            r_theirs = theirs()
            t_theirs.append(time.perf_counter() - start)
            c_theirs.append(time.process_time() - cpu)
            start, cpu = time.perf_counter(), time.process_time()
            r_ours = ours()
            t_ours.append(time.perf_counter() - start)
            c_ours.append(time.process_time() - cpu)
        row = {"case": name, "skimage_s": statistics.median(t_theirs), "ours_s": statistics.median(t_ours),
               "skimage_cpu_s": statistics.median(c_theirs), "ours_cpu_s": statistics.median(c_ours)}
        row["ratio"] = row["skimage_s"] / row["ours_s"]
        row["cpu_ratio"] = row["skimage_cpu_s"] / row["ours_cpu_s"]
        if error is not None:
            row["skimage_rmse"], row["ours_rmse"] = error(r_theirs), error(r_ours)
        if name.startswith("radon"):
            row["rel_diff"] = float(np.linalg.norm(r_ours - r_theirs) / np.linalg.norm(r_theirs))
        if name.startswith("SART"):
            row["setup_s"] = setup
        rows.append(row)
    return rows


def bench_accuracy() -> dict:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import iradon as sk_iradon
    from skimage.transform import iradon_sart as sk_sart
    from skimage.transform import radon as sk_radon

    from napari_soct.processing.tomography import iradon, iradon_sart, radon

    image = shepp_logan_phantom()
    theta = np.linspace(0.0, 180.0, 180, endpoint=False)
    sino = sk_radon(image, theta)
    ours_sino = radon(image, theta)
    out = {"radon_rel_diff": float(np.linalg.norm(ours_sino - sino) / np.linalg.norm(sino)), "filters": []}
    for name in ("ramp", "shepp-logan", "cosine", "hamming", "hann"):
        out["filters"].append({
            "filter": name,
            "skimage": _rmse(sk_iradon(sino, theta, filter_name=name), image),
            "ours": _rmse(iradon(sino, theta, filter_name=name), image),
            "ours_on_ours": _rmse(iradon(ours_sino, theta, filter_name=name), image),
        })
    one = sk_sart(sino, theta)
    out["sart"] = {"skimage_1": _rmse(one, image)}
    out["sart"]["skimage_2"] = _rmse(sk_sart(sino, theta, image=one.copy()), image)
    for it in (1, 2):
        out["sart"][f"ours_{it}"] = _rmse(iradon_sart(sino, theta, iterations=it), image)
        out["sart"][f"ours_on_ours_{it}"] = _rmse(iradon_sart(ours_sino, theta, iterations=it), image)
    return out


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_stack(path: str, out: str, budget_mib: float, workers: int) -> None:
    """Run in a fresh process: reconstruct the stack, print peak RSS figures as JSON."""
    from napari_soct.processing._jit import warm_up
    from napari_soct.processing.io.images import open_image
    from napari_soct.processing.tomography import reconstruct_stack

    warm_up()  # the numba runtime and compiled kernels (when installed) are code: counted with the imports
    sinograms = open_image(path)
    baseline = _rss_mib()
    start = time.perf_counter()
    result = reconstruct_stack(sinograms, out, workers=workers, memory_budget_gb=budget_mib / 1024,
                               compression="none", if_exists="overwrite")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "seconds": seconds,
                      "workers": result.workers_used, "estimate_mib": result.peak_memory_estimate_bytes / 2**20}))


def bench_stack(data: Path, n_slices: int, n_det: int, n_angles: int, budget_mib: float, workers: int) -> dict:
    import zarr
    from skimage.data import shepp_logan_phantom
    from skimage.transform import rescale

    from napari_soct.processing.tomography import radon

    path = data / f"sinograms_{n_slices}x{n_det}x{n_angles}.zarr"
    if not path.exists():
        image = rescale(shepp_logan_phantom(), n_det / 400, order=1).astype(np.float32)[:n_det, :n_det]
        one = radon(image, np.linspace(0, 180, n_angles, endpoint=False))
        store = zarr.create_array(str(path), shape=(n_slices, n_det, n_angles), chunks=(1, n_det, n_angles),
                                  dtype=np.float32)
        for z in range(n_slices):
            store[z] = one * np.float32(0.5 + z / n_slices)
    out = data / "stack_out"
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.run([sys.executable, __file__, "--child", str(path), str(out), str(budget_mib), str(workers)],
                           capture_output=True, text=True, check=True)
    record = json.loads(child.stdout.strip().splitlines()[-1])
    record.update(stack_mib=n_slices * n_det * n_angles * 4 / 2**20, budget_mib=budget_mib, shape=[n_slices, n_det, n_angles])
    return record


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_stack(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="our CPU threads (default: all cores)")
    parser.add_argument("--data", type=Path, default=Path("bench_tomography"))
    parser.add_argument("--stack", type=int, nargs=3, default=(256, 512, 512), metavar=("SLICES", "DET", "ANGLES"))
    parser.add_argument("--budget-mib", type=float, default=128.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "accuracy", "stack"))
    args = parser.parse_args()
    from napari_soct.processing.tomography._backend import default_threads

    threads = args.threads or default_threads()
    args.data.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {default_threads()} cores available, "
          f"python {platform.python_version()}, our threads: {threads}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    if "speed" not in args.skip:
        rows = bench_speed(args.repeats, threads)
        print(f"| case (median of {args.repeats}) | scikit-image [s] | ours [s] | speed-up | CPU s scikit-image | "
              "CPU s ours (all threads) | CPU speed-up | RMSE scikit-image | RMSE ours |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            extra = (f"{r['skimage_rmse']:.5f} | {r['ours_rmse']:.5f}" if "ours_rmse" in r
                     else f"sinograms differ by {100 * r['rel_diff']:.2f} % | ")
            print(f"| {r['case']} | {r['skimage_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.1f}x | "
                  f"{r['skimage_cpu_s']:.3f} | {r['ours_cpu_s']:.3f} | {r['cpu_ratio']:.1f}x | {extra} |")
        sart = [r for r in rows if "setup_s" in r]
        if sart:
            print(f"\nSART geometry (once per angle set, reused by every iteration and slice): {sart[0]['setup_s']:.3f} s")
        print()
    if "accuracy" not in args.skip:
        acc = bench_accuracy()
        print("Shepp-Logan phantom 400 x 400, 180 angles, noiseless: RMSE against the phantom")
        print("(sinogram: scikit-image's radon unless said; ours differs from it by "
              f"{100 * acc['radon_rel_diff']:.2f} % of its norm)\n")
        print("| reconstruction | scikit-image | ours | ours on our radon |")
        print("|---|---:|---:|---:|")
        for f in acc["filters"]:
            print(f"| FBP {f['filter']} | {f['skimage']:.6f} | {f['ours']:.6f} | {f['ours_on_ours']:.6f} |")
        s = acc["sart"]
        for it in (1, 2):
            print(f"| SART {it} iteration{'s' if it > 1 else ''} | {s[f'skimage_{it}']:.6f} | {s[f'ours_{it}']:.6f} | "
                  f"{s[f'ours_on_ours_{it}']:.6f} |")
        print()
    if "stack" not in args.skip:
        rec = bench_stack(args.data, *args.stack, args.budget_mib, args.workers)
        print("| stack (slice x detector x angle) | size | budget | workers | time | RSS after imports | peak RSS | "
              "peak above imports |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {' x '.join(map(str, rec['shape']))} float32 | {rec['stack_mib']:.0f} MiB | {rec['budget_mib']:.0f} MiB | "
              f"{rec['workers']} | {rec['seconds']:.1f} s | {rec['baseline_mib']:.0f} MiB | {rec['peak_mib']:.0f} MiB | "
              f"{rec['peak_mib'] - rec['baseline_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
