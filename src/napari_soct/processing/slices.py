"""Running a step slice by slice: input discovery, parallel slices under a memory budget, atomic outputs,
resume (``if_exists="skip"``), cancellation and one metrics file per step.

A per-slice step only writes the code for one slice::

    def process_slice(in_path, out_tmp, tracker) -> dict:
        ...  # read in_path, write an OME-Zarr at out_tmp, tracker.advance() per unit of work
        return {"metric": 1.0}

    result = run_slice_step("stitch", source, out_dir, process_slice, params)
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from functools import partial
from contextvars import ContextVar
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from .io.atomic import atomic_output, check_can_write
from .memory import return_large_buffers_to_os
from .io.atomic import IF_EXISTS_CHOICES
from .params import param, validate_params
from .progress import Cancelled, Progress, ProgressCallback

__all__ = ["SliceStepResult", "SliceRunParams", "find_slice_files", "slice_output_name", "run_slice_step", "StopFlag",
           "current_client", "slices_on_client", "map_in_threads", "map_on_client", "map_slices",
           "current_dask_worker", "map_subtasks", "write_in_parts"]

GIB = 1024**3
_SLICE_FILE_RE = re.compile(r"(?:^|_)z(\d+)(?:_[A-Za-z0-9-]+)*\.ome\.zarr$")


@dataclass
class SliceRunParams:
    """How a per-slice step runs (not what it computes): parallel slices, memory, existing outputs.

    Step parameter dataclasses inherit from it, so these options are declared once for every step.
    """

    workers: int = param(2, "Slices processed in parallel (at most)", min=1, max=256, advanced=True)
    memory_budget_gb: float = param(4.0, "Peak memory the step may use, in GiB", min=1e-6, unit="GiB",
                                     advanced=True)
    if_exists: str = param(
        "error", "Existing outputs: 'error' refuses, 'skip' keeps them (resume), 'overwrite' replaces them",
        choices=IF_EXISTS_CHOICES, advanced=True,
    )


def slice_output_name(slice_id: int, step: str) -> str:
    """``slice_z{NN}_{step}.ome.zarr`` (two digits at least)."""
    return f"slice_z{slice_id:02d}_{step}.ome.zarr"


def find_slice_files(source: str | os.PathLike) -> dict[int, Path]:
    """Per-slice OME-Zarr files in a folder (``mosaic_grid_3d_z07.ome.zarr``, ``slice_z07_stitch.ome.zarr``),
    or a single such file.

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist or holds no per-slice file.
    ValueError
        If two files in the folder claim the same slice (say which), or a file name has no slice id.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.name.endswith(".ome.zarr"):
        match = _SLICE_FILE_RE.search(source.name)
        if not match:
            raise ValueError(f"{source}: no slice id (_z<NN>) in the file name")
        return {int(match.group(1)): source}
    found: dict[int, Path] = {}
    for entry in sorted(source.iterdir()):
        match = _SLICE_FILE_RE.search(entry.name)
        if not match or entry.name.startswith("."):
            continue
        sid = int(match.group(1))
        if sid in found:
            raise ValueError(
                f"{source}: two files for slice {sid}: {found[sid].name} and {entry.name}; "
                "point the step at a folder with one file per slice, or at one file"
            )
        found[sid] = entry
    if not found:
        raise FileNotFoundError(f"{source}: no per-slice OME-Zarr files (*_z<NN>*.ome.zarr)")
    return dict(sorted(found.items()))


@dataclass
class SliceStepResult:
    """What a per-slice step produced.

    Attributes
    ----------
    step : str
    out_dir : Path
    outputs : dict
        ``{slice_id: Path}`` of every output, written now or kept from an earlier run.
    metrics : dict
        ``{slice_id: dict}`` returned by the per-slice function (empty for kept slices).
    metrics_path : Path
    skipped : list of int
        Slices whose output existed and was kept (``if_exists="skip"``).
    inputs : dict
        ``{slice_id: Path}`` of the file each output was made from.
    """

    step: str
    out_dir: Path
    outputs: dict[int, Path]
    metrics: dict[int, dict]
    metrics_path: Path
    seconds: float = 0.0
    workers_used: int = 1
    skipped: list[int] = field(default_factory=list)
    inputs: dict[int, Path] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [self.outputs[s] for s in sorted(self.outputs)]


class StopFlag:
    """Set when the user cancels or another worker failed; quacks like ``threading.Event`` for ``Progress``."""

    def __init__(self, cancel=None):
        self.event = threading.Event()
        self._cancel = cancel

    def is_set(self) -> bool:
        return self.event.is_set() or (self._cancel is not None and self._cancel.is_set())


def _jsonable(value):
    if is_dataclass(value):
        return asdict(value)
    return str(value)


def run_slice_step(
    step: str,
    source,
    out_dir,
    process_slice: Callable[[Path, Path, Progress], dict],
    params,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    units_per_slice: Callable[[Path], int] | None = None,
    memory_per_slice_bytes: Callable[[Path], int] | None = None,
    output_name: Callable[[int], str] | None = None,
) -> SliceStepResult:
    """Run ``process_slice`` on every slice of ``source`` and write one output per slice into ``out_dir``.

    Parameters
    ----------
    step : str
        Step name (output names ``slice_z{NN}_{step}.ome.zarr``, metrics ``{step}_metrics.json``).
    source : path
        Folder of per-slice files, or one file (see :func:`find_slice_files`).
    process_slice : callable
        ``process_slice(in_path, out_tmp, tracker) -> metrics dict``; writes the output at ``out_tmp``.
    params : dataclass
        Step parameters with ``workers``, ``memory_budget_gb`` and ``if_exists`` fields.
    units_per_slice : callable, optional
        Progress units of one slice, which ``process_slice`` then reports itself with ``tracker.advance``;
        by default a slice is one unit, reported by the runner.
    memory_per_slice_bytes : callable, optional
        Peak bytes one slice worker holds; the number of parallel slices is
        ``min(workers, memory_budget_gb // max(memory_per_slice))``.
    output_name : callable, optional
        ``output_name(slice_id) -> file name`` (default :func:`slice_output_name`).

    Raises
    ------
    ValueError
        If one slice needs more memory than the budget.
    Cancelled
        When ``cancel`` is set; no partial output is left.
    """
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    inputs = find_slice_files(source)
    out_dir = Path(out_dir)
    name_of = output_name or (lambda sid: slice_output_name(sid, step))
    targets = {sid: out_dir / name_of(sid) for sid in inputs}
    to_run = [sid for sid in inputs if check_can_write(targets[sid], params.if_exists)]
    skipped = [sid for sid in inputs if sid not in to_run]
    metrics_path = out_dir / f"{step}_metrics.json"

    budget = int(params.memory_budget_gb * GIB)
    need = max((memory_per_slice_bytes(inputs[s]) for s in to_run), default=0) if memory_per_slice_bytes else 0
    if need > budget:
        raise ValueError(
            f"memory_budget_gb={params.memory_budget_gb} is below the {need / GIB:.2f} GiB one slice of step "
            f"'{step}' needs; raise memory_budget_gb"
        )
    n_workers = max(1, min(params.workers, len(to_run) or 1, budget // need if need else params.workers))
    units = {sid: (units_per_slice(inputs[sid]) if units_per_slice else 1) for sid in to_run}
    stop = StopFlag(cancel)
    tracker = Progress(sum(units.values()), progress, stop)
    tracker.check()
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(sid: int) -> dict:
        with atomic_output(targets[sid], "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
            result = process_slice(inputs[sid], tmp, tracker) or {}
        if units_per_slice is None:  # otherwise process_slice reports its own units
            tracker.advance(1, f"slice {sid} done")
        return result

    metrics: dict[int, dict] = {}
    client = current_client()
    if client is not None and to_run:
        metrics = _run_on_client(client, step, inputs, targets, to_run, process_slice, params, units, tracker, stop)
        n_workers = len(client.scheduler_info().get("workers", {})) or n_workers
    else:
        metrics = map_in_threads(one, to_run, n_workers, stop, f"soct-{step}")
    seconds = time.perf_counter() - started
    record = {
        "step": step,
        "source": str(Path(source).resolve()),
        "params": asdict(params),
        "seconds": seconds,
        "workers_used": n_workers,
        "skipped": skipped,
        "slices": {str(sid): m for sid, m in sorted(metrics.items())},
    }
    if metrics or not metrics_path.exists():
        with atomic_output(metrics_path, "overwrite") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2, default=_jsonable))
    return SliceStepResult(
        step=step,
        out_dir=out_dir,
        outputs={sid: targets[sid] for sid in inputs},
        metrics=metrics,
        metrics_path=metrics_path,
        seconds=seconds,
        workers_used=n_workers,
        skipped=skipped,
        inputs=dict(inputs),
    )


def map_slices(fn, slice_ids, n_workers: int, name: str, cancel=None) -> dict:
    """``{slice id: fn(slice id)}`` for a pass over slices that writes nothing (measurements): one dask task per
    slice inside a run on a cluster (``fn`` must pickle), else ``n_workers`` threads here."""
    slice_ids = list(slice_ids)
    stop = StopFlag(cancel)
    client = current_client()
    if client is not None and slice_ids:
        tracker = Progress(len(slice_ids), None, stop)
        return map_on_client(client, fn, slice_ids, {sid: 1 for sid in slice_ids}, tracker, stop, name)
    return map_in_threads(fn, slice_ids, max(1, n_workers), stop, name)


def map_in_threads(fn, items, n_workers: int, stop: StopFlag, name: str = "soct") -> dict:
    """``{item: fn(item)}`` on a thread pool; the first failure sets ``stop`` (so the others end early, when
    they check it) and is raised once every thread has finished, a real error before a ``Cancelled``."""
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix=name) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            stop.event.set()
        wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            real = [e for e in errors if not isinstance(e, Cancelled)]
            raise (real or errors)[0]
        return {sid: future.result() for future, sid in futures.items()}


# ---------------------------------------------------------------------------------------- dask.distributed
_CLIENT: ContextVar = ContextVar("napari_soct_dask_client", default=None)


def current_client():
    """The ``distributed.Client`` per-slice steps submit their slices to, or None (local threads)."""
    return _CLIENT.get()


@contextmanager
def slices_on_client(client):
    """Run every per-slice step called inside this block as one dask task per slice on ``client``.

    The caller owns the client (a ``LocalCluster``, a SLURM/Kubernetes cluster, ``Client("tcp://...")``);
    nothing here starts or stops one. ``None`` keeps the local thread pool.
    """
    token = _CLIENT.set(client)
    try:
        yield client
    finally:
        _CLIENT.reset(token)


def _slice_task(process_slice, inputs: dict, targets: dict, overwrite: bool, units: dict, sid: int) -> dict:
    """One slice on a dask worker: the same atomic output as locally, progress counted on the driver."""
    with atomic_output(targets[sid], "overwrite" if overwrite else "error") as tmp:
        return process_slice(inputs[sid], tmp, Progress(units[sid])) or {}


def _run_on_client(client, step, inputs, targets, to_run, process_slice, params, units, tracker, stop):
    task = partial(_slice_task, process_slice, inputs, targets, params.if_exists == "overwrite", units)
    return map_on_client(client, task, to_run, units, tracker, stop, f"soct-{step}")


def current_dask_worker():
    """The dask worker this code runs on as a task, or None (without importing distributed: on a worker it is
    loaded already)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:
        return None


# Sub-tasks go before the slice tasks still queued: a worker whose slice task waits for its sub-tasks takes
# them rather than opening another slice (dask gives a waiting task's thread to the next task in priority
# order, by default the slices submitted first: every slice would be opened and held in memory before the
# first one's sub-tasks ran).
SUBTASK_PRIORITY = 1


def map_subtasks(fn, items: list, name: str, shared=None) -> list:
    """``[fn(item) for item in items]`` (``fn(shared, item)`` when ``shared`` is given), as sub-tasks when this
    runs as a task on a dask worker: the calling task leaves its thread while they run, so that any idle worker
    of the cluster takes them; ``shared`` (a large array, say) is sent to the workers once, not with each
    sub-task. ``fn`` must pickle, and its results must not depend on where it runs."""
    call = fn if shared is None else partial(fn, shared)
    if current_dask_worker() is None or len(items) < 2:
        return [call(item) for item in items]
    from distributed import worker_client

    with worker_client() as client:
        futures = []
        # hash=False: a key of its own (equal values scattered by two tasks would share one and race)
        shared_future = client.scatter(shared, direct=True, hash=False) if shared is not None else None
        for i, item in enumerate(items):
            args = (fn, item) if shared is None else (fn, shared_future, item)
            futures.append(client.submit(_on_worker, *args, key=f"{name}-{i}-{uuid.uuid4().hex[:8]}", pure=False,
                                         priority=SUBTASK_PRIORITY))
        return [future.result() for future in futures]


def write_in_parts(write_region, out_path, writer, tracker: Progress, units: int, name: str, shared=None) -> list:
    """Write a multiscale output region by region.

    ``write_region(writer, region, on_block)`` (``write_region(shared, writer, region, on_block)`` with
    ``shared``) writes every block of the ``(y, x)`` ``region`` of ``writer`` (a ``PyramidWriter``) and calls
    ``on_block()`` after each. Here it is called once on the whole image, advancing ``tracker`` per block. On a
    dask worker the image is cut into parts that own whole chunks at every level (``PyramidWriter.parts``),
    written as sub-tasks that reopen ``out_path`` (so ``write_region`` must pickle), and ``tracker`` advances by
    ``units`` when all are done. Blocks of a part must give the same voxels as blocks of the whole image.
    Returns what ``write_region`` returned, per part.
    """
    call = write_region if shared is None else partial(write_region, shared)
    parts = writer.parts() if current_dask_worker() is not None else []
    if len(parts) < 2:
        done = [0]

        def on_block():
            done[0] += 1
            if done[0] <= units:
                tracker.advance(1, f"{Path(out_path).name}: block")
            else:
                tracker.check()

        result = call(writer, tuple(slice(0, n) for n in writer.shape[-2:]), on_block)
        tracker.advance(max(0, units - done[0]), f"{Path(out_path).name}: written")
        return [result]
    results = map_subtasks(partial(_write_part, write_region, str(out_path)), parts, name, shared=shared)
    tracker.advance(units, f"{Path(out_path).name}: {len(parts)} parts written")
    return results


def _write_part(write_region, out_path: str, *args):
    from .io.omezarr import open_pyramid_writer

    *shared, region = args
    return write_region(*shared, open_pyramid_writer(out_path), region, lambda: None)


def _on_worker(fn, *args):
    """A task on a dask worker, in the process settings every step assumes: dask starts workers with
    ``MALLOC_TRIM_THRESHOLD_`` set, which freezes glibc's mmap threshold at 128 KiB (every larger buffer then
    costs page faults each time it is allocated; stitching ran 1.6x slower)."""
    return_large_buffers_to_os()
    return fn(*args)


def map_on_client(client, fn, slice_ids, units: dict, tracker: Progress, stop: StopFlag, name: str) -> dict:
    """``{slice id: fn(slice id)}``, one dask task per slice on ``client`` (``fn`` must pickle: a module-level
    function or a ``functools.partial`` of one). The driver advances ``tracker`` by ``units[sid]`` as each
    slice finishes; the first failure (or a cancel) sets ``stop``, cancels the other tasks and is raised."""
    from distributed import as_completed

    futures = {client.submit(_on_worker, fn, sid, key=f"{name}-z{sid:02d}-{uuid.uuid4().hex[:8]}", pure=False): sid
               for sid in slice_ids}
    results: dict = {}
    try:
        for future in as_completed(futures):
            sid = futures[future]
            results[sid] = future.result()  # re-raises the worker's exception
            tracker.advance(units[sid], f"slice {sid} done")
    except BaseException:
        stop.event.set()
        client.cancel(list(futures))
        raise
    return results
