"""One run from raw tiles to the brain volume: ``napari-soct run run.toml``.

The run file is the usual config file (one section per step, see :mod:`napari_soct.pipeline.config`) plus a
``[run]`` section (:class:`RunParams`: the folders, which optional steps run, a profile). The run is the
preprocessing followed by the reconstruction chain (:func:`napari_soct.pipeline.reconstruct.reconstruct`'s
stages); no step is re-implemented here.

Where it runs: per-slice steps submit one dask task per slice. ``scheduler="local"`` (default) starts a
``distributed.LocalCluster`` of ``workers`` single-threaded processes on this machine for the run;
``scheduler="threads"`` uses a thread pool in this process (no dask); ``scheduler="tcp://host:port"`` (or a
``distributed.Client`` given from Python) uses an existing cluster, which the caller owns (SLURM, Kubernetes:
see ``docs/cluster.md``). Steps that are not per slice run in this process.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..processing.params import param
from .chain import ChainState, StageOutcome, folder_fingerprint, run_stages
from .reconstruct import ReconstructParams, enabled_stages, run_options
from .steps import STEPS

__all__ = ["RunParams", "RunResult", "run_pipeline", "run_pipeline_in_subprocess", "PROFILES", "PREPROCESS_STAGE"]

#: Named parameter sets, like the lab's Nextflow profiles: ``{section: {key: value}}`` applied over the
#: defaults, below what the run file sets itself.
PROFILES: dict[str, dict[str, dict]] = {
    # Trust the stage: rotation only from registration, tight confidence gates, no image-based refinement.
    "conservative": {
        "stack": {"apply_rotation_only": True, "confidence_full": 0.8, "confidence_rotation": 0.5},
        "register": {"max_rotation_deg": 2.0},
        "common-space": {"refine_unreliable": False},
    },
    # Trust the images: full transforms at lower confidence, refine unreliable stage transitions.
    "aggressive": {
        "stack": {"apply_rotation_only": False, "confidence_full": 0.4, "confidence_rotation": 0.2},
        "register": {"max_rotation_deg": 5.0},
    },
    # The shortest path to a volume: only the steps that cannot be skipped.
    "minimal": {
        "run": {"fix_illumination": False, "assess_quality": False, "detect_rehoming": False,
                "interpolate_missing": False, "auto_exclude": False, "correct_bias": False},
    },
}


@dataclass
class RunParams(ReconstructParams):
    """The ``[run]`` section of a run file."""

    raw_dir: str = param("", "Raw acquisition folder (tile_x*_y*_z* folders)")
    out_dir: str = param("", "Output folder of the run (one sub-folder per step, records in .soct/)")
    profile: str = param("", "Named parameter set applied under the file's own values",
                         choices=("", *PROFILES))
    scheduler: str = param("local", "'local': a LocalCluster of `workers` processes; 'threads': this process; "
                           "or the address of a running dask scheduler (tcp://host:port)")


#: Preprocessing, the stage before the reconstruction chain.
def _preprocess(step, state, where, run):
    r = step.function(state.raw_dir, where, **run)
    state.mosaic_dir = where
    state.shifts = r.shifts_path
    state.slice_config = r.slice_config_path
    return r, [*r.mosaic_paths, r.shifts_path]


def _stage_preprocess():
    from .chain import Stage

    return Stage("preprocess", "00_preprocess", None, _preprocess)


PREPROCESS_STAGE = _stage_preprocess()


@dataclass
class RunResult:
    out_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    volume: Path | None = None
    report: Path | None = None
    seconds: float = 0.0


#: Memory a worker process needs besides its share of the steps' budget (interpreter, imported libraries).
WORKER_PROCESS_GIB = 0.5

#: One core per worker: every threaded library a step uses runs single-threaded in a worker process (dask's
#: own default for BLAS/OpenMP, extended to zarr's codec threads and numba), so ``workers`` is the number of
#: cores a run uses and N workers never oversubscribe N cores.
ONE_CORE_ENVIRON = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
    "ZARR_THREADING__MAX_WORKERS": "1",
}


def local_worker_config() -> dict:
    """dask settings of the LocalCluster a run starts: one core per worker (:data:`ONE_CORE_ENVIRON`), and no
    pausing or spilling, which only stall tasks that hold no dask data: the steps keep their own memory budget
    (``memory_budget_gb / workers`` each), and the worker's limit (that plus :data:`WORKER_PROCESS_GIB`) stays
    as the last guard."""
    import dask

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ONE_CORE_ENVIRON}
    return {"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.memory.target": False,
            "distributed.worker.memory.spill": False, "distributed.worker.memory.pause": False}


@contextlib.contextmanager
def _dask_client(scheduler: str, workers: int, memory_budget_gb: float, client=None):
    """The client the run submits slices to (None: threads); closes only what it opened."""
    from ..processing.slices import slices_on_client

    if client is not None:
        with slices_on_client(client):
            yield client
        return
    if scheduler == "threads":
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        import dask

        with dask.config.set(local_worker_config()):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   memory_limit=f"{memory_budget_gb / workers + WORKER_PROCESS_GIB:.3f}GiB")
        with cluster, Client(cluster) as own, slices_on_client(own):
            yield own
        return
    with Client(scheduler) as own, slices_on_client(own):
        yield own


def run_pipeline(run: RunParams | str | Path, *, step_params: dict | None = None, rerun_from: str | None = None,
                 until: str | None = None, client=None, progress=None, cancel=None, on_stage=None) -> RunResult:
    """Raw tiles to brain volume: preprocessing, steps 1-16 and the report, resumable.

    Parameters
    ----------
    run : RunParams or path
        The ``[run]`` parameters, or a run file (TOML) holding them and the step sections.
    step_params : dict, optional
        ``{step name: params dataclass}`` overriding the file.
    rerun_from, until : str, optional
        Recompute from this step on (earlier steps are kept) / stop after this step.
    client : distributed.Client, optional
        Run the per-slice tasks on this client (overrides ``run.scheduler``); the caller keeps ownership.
    progress, cancel, on_stage
        See :func:`napari_soct.pipeline.chain.run_stages`.
    """
    from .config import load_run_file

    configured: dict = {}
    if not isinstance(run, RunParams):
        run, configured = load_run_file(run)
    configured.update(step_params or {})
    if not run.raw_dir or not run.out_dir:
        raise ValueError("[run] raw_dir and out_dir must both be given")
    raw_dir, out_dir = Path(run.raw_dir), Path(run.out_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"[run] raw_dir: {raw_dir} is not a folder")
    started = time.perf_counter()
    state = ChainState(out_dir, raw_dir=raw_dir, atlas_template=run.atlas_template)
    stages = [PREPROCESS_STAGE, *enabled_stages(run)]
    missing = [s.step for s in stages if s.step not in STEPS]
    if missing:
        raise ValueError(f"step(s) {', '.join(missing)} are not available in this installation")
    with _dask_client(run.scheduler, run.workers, run.memory_budget_gb, client):
        outcomes = run_stages(stages, state, configured=configured, options=run_options(run),
                              origin=folder_fingerprint(raw_dir), rerun_from=rerun_from, until=until,
                              progress=progress, cancel=cancel, on_stage=on_stage)
    return RunResult(out_dir, outcomes, state.volume, state.report, time.perf_counter() - started)


def _child(run, step_params, rerun_from, until, queue, cancel, nice) -> None:
    """Entry point of :func:`run_pipeline_in_subprocess`'s process: runs, and reports through ``queue``."""
    import os

    from ..processing.progress import Cancelled

    if nice and hasattr(os, "nice"):
        os.nice(nice)

    def progress(done, total, message):
        queue.put(("progress", (done, total, message)))

    def on_stage(outcome, state):
        queue.put(("stage", StageOutcome(outcome.step, outcome.action, None, outcome.seconds, outcome.outputs)))

    try:
        result = run_pipeline(run, step_params=step_params, rerun_from=rerun_from, until=until, progress=progress,
                              cancel=cancel, on_stage=on_stage)
        slim = [StageOutcome(o.step, o.action, None, o.seconds, o.outputs) for o in result.outcomes]
        queue.put(("done", RunResult(result.out_dir, slim, result.volume, result.report, result.seconds)))
    except Cancelled as err:
        queue.put(("cancelled", str(err)))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_pipeline_in_subprocess(run: RunParams, *, step_params: dict | None = None, rerun_from: str | None = None,
                               until: str | None = None, progress=None, cancel=None, on_stage=None,
                               nice: int = 0) -> RunResult:
    """:func:`run_pipeline` in a fresh process, with progress, finished steps and cancellation relayed here.

    The run shares nothing with the calling process (no GIL, no memory): what a GUI needs to stay responsive.
    ``on_stage(outcome, None)`` gets outcomes without the step's result object; the returned
    :class:`RunResult` likewise. ``nice`` lowers the run's CPU priority (POSIX), so that an interactive caller
    keeps the processor when it needs it.
    """
    import multiprocessing
    import queue as queues

    from ..processing.progress import Cancelled

    ctx = multiprocessing.get_context("spawn")
    channel = ctx.Queue()
    stop = ctx.Event()
    process = ctx.Process(target=_child, args=(run, step_params or {}, rerun_from, until, channel, stop, nice),
                          name="napari-soct-run")
    process.start()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                stop.set()
            try:
                kind, payload = channel.get(timeout=0.1)
            except queues.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the run's process ended unexpectedly (exit code {process.exitcode})")
                continue
            if kind == "progress" and progress is not None:
                progress(*payload)
            elif kind == "stage" and on_stage is not None:
                on_stage(payload, None)
            elif kind == "done":
                return payload
            elif kind == "cancelled":
                raise Cancelled(payload)
            elif kind == "error":
                raise RuntimeError(payload)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
