"""Check: the whole run from the command line on a phantom, the same volume three ways (issue 5's "done when").

1. ``napari-soct run RUN.toml`` (default scheduler: a LocalCluster of 2 workers the run starts);
2. the same command killed with SIGKILL while stitching, then run again (resume);
3. the same command with ``--scheduler tcp://...`` of a LocalCluster this script starts.

Prints each run's time and the checksum of its final products (every voxel of the normalised slices and of the
stacked volume's levels, and the tables that drive them; ``tests/test_runner.py::volume_checksum``), and any
temporary output left behind.

Usage::

    python benchmarks/check_runner_resume.py --preset small --out /tmp/runner-check
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _run_file(root: Path, raw: Path, name: str) -> Path:
    defaults = subprocess.run(["napari-soct", "config", "--defaults"], check=True, capture_output=True,
                              text=True).stdout
    path = root / f"{name}.toml"
    path.write_text(defaults.replace('raw_dir = ""', f'raw_dir = "{raw}"')
                    .replace('out_dir = ""', f'out_dir = "{root / name}"'))
    return path


def main() -> None:
    from distributed import LocalCluster
    from test_runner import volume_checksum

    from napari_soct.processing.synthetic import make_acquisition

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default="/tmp/runner-check")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    raw = make_acquisition(root / "acq", preset=args.preset, seed=0).raw_dir

    started = time.perf_counter()
    subprocess.run(["napari-soct", "run", str(_run_file(root, raw, "once"))], check=True, capture_output=True)
    print(f"one command: {time.perf_counter() - started:.1f} s, checksum {volume_checksum(root / 'once')[:16]}")

    killed = _run_file(root, raw, "killed")
    proc = subprocess.Popen(["napari-soct", "run", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pending = root / "killed" / ".soct" / "stitch.pending.json"
    while not pending.exists() and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (root / "killed" / ".soct").iterdir())
    subprocess.run(["napari-soct", "run", str(killed)], check=True, capture_output=True)
    print(f"killed while stitching (records then: {done}), run again: checksum "
          f"{volume_checksum(root / 'killed')[:16]}")

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        subprocess.run(["napari-soct", "run", str(_run_file(root, raw, "address")), "--scheduler",
                        cluster.scheduler_address], check=True, capture_output=True)
    print(f"--scheduler {cluster.scheduler_address}: checksum {volume_checksum(root / 'address')[:16]}")
    left = [str(p) for name in ("once", "killed", "address") for p in (root / name).rglob("*")
            if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".pending.json")]
    print("temporary outputs left:", left or "none")


if __name__ == "__main__":
    main()
