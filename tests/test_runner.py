"""``napari-soct run``: run files, profiles, resume records, and the same volume whatever runs it.

The identity checks compare checksums of every voxel of the final outputs (and of the tables) between an
uninterrupted run with one worker and: two threads, a ``distributed.LocalCluster`` of two worker processes,
a run killed with SIGKILL in the middle of a step and resumed, and a run whose dask worker was killed while
it processed a slice.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from napari_soct.pipeline.config import defaults_toml, load_run_file
from napari_soct.pipeline.runner import PROFILES, RunParams, run_pipeline
from napari_soct.processing.io.omezarr import is_ome_zarr, open_ome_zarr
from napari_soct.processing.synthetic import make_acquisition


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    acq = make_acquisition(tmp_path_factory.mktemp("acq"), preset="tiny", seed=3, n_slices=5)
    return acq.raw_dir


ASSEMBLE = True


def _params(raw, out, **kw) -> RunParams:
    return RunParams(raw_dir=str(raw), out_dir=str(out), scheduler="threads", assemble=ASSEMBLE, **kw)


def volume_checksum(out: Path) -> str:
    """Digest of the run's final products: every voxel of the final images and the tables that drive them."""
    h = hashlib.sha256()
    finals = sorted((out / "07_normalize").glob("*.ome.zarr"))
    finals += sorted(p for p in (out / "14_stack").glob("*.ome.zarr")) if (out / "14_stack").is_dir() else []
    assert finals
    for path in finals:
        for level in open_ome_zarr(path).levels:
            h.update(np.ascontiguousarray(level[...]).tobytes())
    for table in sorted(out.rglob("*.csv")):
        h.update(table.read_bytes())
    return h.hexdigest()


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".pending.json")]


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_pipeline(_params(raw, out, workers=1))
    return out, result, volume_checksum(out)


# ------------------------------------------------------------------------------------------------ run files
def test_defaults_file_round_trips_and_rejects_bad_keys(tmp_path, raw):
    text = defaults_toml().replace('raw_dir = ""', f'raw_dir = "{raw}"').replace('out_dir = ""', 'out_dir = "out"')
    path = tmp_path / "run.toml"
    path.write_text(text)
    run, steps = load_run_file(path)
    assert run.raw_dir == str(raw) and run.out_dir == str((tmp_path / "out").resolve())
    assert set(steps) >= {"preprocess", "stitch", "normalize"}
    path.write_text(text.replace("[stitch]\n", "[stitch]\nnot_a_parameter = 1\n"))
    with pytest.raises(ValueError, match="stitch.not_a_parameter"):
        load_run_file(path)
    path.write_text('[run]\nworkers = 0\n')
    with pytest.raises(ValueError, match="run.workers"):
        load_run_file(path)
    path.write_text('[run]\nprofile = "reckless"\n')
    with pytest.raises(ValueError, match="reckless"):
        load_run_file(path)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_apply_under_the_files_values(tmp_path, profile):
    path = tmp_path / "run.toml"
    section, values = next((s, v) for s, v in PROFILES[profile].items())
    key, value = next(iter(values.items()))
    path.write_text(f'[run]\nprofile = "{profile}"\n')
    run, steps = load_run_file(path)
    got = getattr(run, key) if section == "run" else getattr(steps[section], key)
    assert got == value
    # The file's own value wins over the profile's.
    own = (not value) if isinstance(value, bool) else value
    if not isinstance(value, bool):
        own = value / 2 if isinstance(value, float) else value
    path.write_text(f'[run]\nprofile = "{profile}"\n[{section}]\n{key} = {str(own).lower()}\n'
                    if section != "run" else f'[run]\nprofile = "{profile}"\n{key} = {str(own).lower()}\n')
    run, steps = load_run_file(path)
    got = getattr(run, key) if section == "run" else getattr(steps[section], key)
    assert got == own


# ------------------------------------------------------------------------------------------------ resume
def test_rerun_keeps_finished_steps_and_recomputes_changed_ones(raw, reference, tmp_path):
    out, result, checksum = reference
    assert all(o.action == "ran" for o in result.outcomes)
    again = run_pipeline(_params(raw, out, workers=1))
    assert {o.action for o in again.outcomes} == {"kept"}
    assert volume_checksum(out) == checksum
    # A changed parameter recomputes its step and every later one; run options (workers) change nothing.
    from napari_soct.processing.correct.intensity import NormalizeParams

    changed = run_pipeline(_params(raw, out, workers=2), step_params={"normalize": NormalizeParams(percentile=90.0)})
    actions = [o.action for o in changed.outcomes]
    first = [o.step for o in changed.outcomes].index("normalize")
    assert actions[:first] == ["kept"] * first and set(actions[first:]) == {"ran"}
    assert volume_checksum(out) != checksum
    back = run_pipeline(_params(raw, out, workers=1))  # back to the defaults: recomputed, same bytes as before
    assert volume_checksum(out) == checksum and back.outcomes[first].action == "ran"


def test_outputs_without_a_record_are_never_replaced(raw, tmp_path):
    out = tmp_path / "run"
    (out / "00_preprocess").mkdir(parents=True)
    (out / "00_preprocess" / "shifts_xy.csv").write_text("not ours\n")
    with pytest.raises(Exception, match="shifts_xy.csv"):
        run_pipeline(_params(raw, out, workers=1))
    assert (out / "00_preprocess" / "shifts_xy.csv").read_text() == "not ours\n"


def test_same_result_with_two_threads(raw, reference, tmp_path):
    _, _, checksum = reference
    run_pipeline(_params(raw, tmp_path / "run", workers=2))
    assert volume_checksum(tmp_path / "run") == checksum


def test_same_result_on_a_local_cluster_of_two_processes(raw, reference, tmp_path):
    from distributed import Client, LocalCluster

    _, _, checksum = reference
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result = run_pipeline(_params(raw, tmp_path / "run", workers=2), client=client)
        assert client.status == "running"  # the caller's client is left open
        # Every per-slice step, preprocessing included, ran as one task per slice on the cluster's workers, and
        # so did the passes over slices that only measure (stitching's registration, normalisation's levels).
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        # The crop's surface detection also ran as sub-tasks of each slice's task (bands of rows).
        for step in ("soct-preprocess", "soct-illumination", "soct-stitch", "soct-stitch-register", "soct-normalize",
                     "soct-normalize-level", "soct-crop-surface"):
            assert step in prefixes, prefixes
    assert volume_checksum(tmp_path / "run") == checksum
    assert not leftovers(tmp_path / "run")
    assert result.outcomes[-1].action == "ran"


def test_runs_on_a_scheduler_address(raw, reference, tmp_path):
    """``scheduler="tcp://..."`` (the CLI's --scheduler): the run connects to a cluster it does not own."""
    from distributed import LocalCluster

    _, _, checksum = reference
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run = replace(_params(raw, tmp_path / "run", workers=2), scheduler=cluster.scheduler_address)
        run_pipeline(run)
        assert len(cluster.workers) == 2  # still running: the run closed only its own client
    assert volume_checksum(tmp_path / "run") == checksum


_KILLABLE = textwrap.dedent("""
    import sys
    from napari_soct.pipeline.runner import RunParams, run_pipeline
    run_pipeline(RunParams(raw_dir=sys.argv[1], out_dir=sys.argv[2], scheduler="threads", workers=1,
                           assemble=sys.argv[3] == "1"))
""")


def test_killed_run_resumes_to_the_same_result(raw, reference, tmp_path):
    """SIGKILL while a step is running (its pending record exists), then run again."""
    _, _, checksum = reference
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(raw), str(out), str(int(ASSEMBLE))])
    deadline = time.monotonic() + 120
    target = out / ".soct" / "stitch.pending.json"
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / ".soct" / "normalize.json").exists()
    result = run_pipeline(_params(raw, out, workers=1))
    actions = {o.step: o.action for o in result.outcomes}
    assert actions["preprocess"] == "kept" and actions["stitch"] in ("resumed", "ran")
    assert volume_checksum(out) == checksum
    assert not leftovers(out)


def test_a_killed_dask_worker_is_replaced_and_the_result_is_the_same(raw, reference, tmp_path):
    """SIGKILL of a worker process while it holds a slice task: the scheduler reruns the task elsewhere."""
    import threading

    from distributed import Client, LocalCluster

    _, _, checksum = reference
    out = tmp_path / "run"
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)

        def killer():
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy and (out / ".soct" / "illumination.pending.json").exists():
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                time.sleep(0.002)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        run_pipeline(_params(raw, out, workers=2), client=client)
        thread.join(1)
    assert killed, "no worker was busy while the illumination step ran"
    assert volume_checksum(out) == checksum
    assert not leftovers(out)
