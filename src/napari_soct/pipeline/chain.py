"""Running registered steps one after the other, with a record per finished step so a re-run resumes.

A chain is a list of :class:`Stage` (a registered step, its folder, how its inputs come from the steps before
it). Before a stage runs, a *digest* is computed from its parameters (minus the options that do not change
results: workers, memory budget, if_exists) and the digest of the stage before it (the first stage: a
fingerprint of the input folder), so a digest stands for everything that produced the stage's outputs.

- A stage whose record (``OUT/.soct/<step>.json``) has the same digest and whose outputs all exist is skipped;
  its record gives the paths the next stages need.
- Otherwise it runs. Leftovers of a killed run in its folder are cleaned first (temporaries removed, a result
  moved aside by an interrupted overwrite restored). A ``<step>.pending.json`` written before the run tells a
  re-run whether finished outputs in the folder come from the same digest (kept: ``if_exists="skip"``, the run
  resumes slice by slice) or from other parameters (replaced, and the progress message says so). Outputs that
  no record explains are never replaced: the user's ``if_exists`` decides (default: error).
- The record is written atomically after the stage finished, then the pending file is removed.

Every output of every step is itself written atomically, so a run killed at any moment (``kill -9``) leaves
finished outputs and cleanable temporaries only, and the re-run produces the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from ..processing.io.atomic import atomic_output, remove_stale_temporaries
from .steps import STEPS, Step

__all__ = ["ChainState", "Stage", "StageOutcome", "run_stages", "folder_fingerprint", "RESULT_NEUTRAL"]

#: Parameters that change how a step runs but not what it computes.
RESULT_NEUTRAL = frozenset({"workers", "memory_budget_gb", "if_exists"})
_STATE_PATHS = ("raw_dir", "mosaic_dir", "slices_dir", "shifts", "slice_config", "common", "interpolated",
                "registration", "volume", "report")


@dataclass
class ChainState:
    """The paths flowing from stage to stage (None: not produced)."""

    out_dir: Path
    raw_dir: Path | None = None
    mosaic_dir: Path | None = None
    slices_dir: Path | None = None
    shifts: Path | None = None
    slice_config: Path | None = None
    common: Path | None = None
    interpolated: Path | None = None
    registration: Path | None = None
    volume: Path | None = None
    report: Path | None = None
    atlas_template: str = ""  # an input of step 16, not produced by a stage

    def paths(self) -> dict[str, str | None]:
        return {k: (None if getattr(self, k) is None else str(getattr(self, k))) for k in _STATE_PATHS}

    def update_from(self, recorded: dict) -> None:
        for key, value in recorded.items():
            if key in _STATE_PATHS:
                setattr(self, key, None if value is None else Path(value))


@dataclass(frozen=True)
class Stage:
    """One registered step in a chain.

    ``call(step, state, where, run_kwargs) -> (result, outputs)`` runs the step with its inputs taken from
    ``state``, updates ``state`` with what it produced, and returns the step's result and the list of output
    paths that must exist for the stage to count as finished.
    """

    step: str
    folder: str
    switch: str | None
    call: Callable[[Step, ChainState, Path, dict], tuple[object, list[Path]]]


@dataclass
class StageOutcome:
    """What happened to one stage: ``ran`` (with its result), ``kept`` (record matched) or ``resumed``."""

    step: str
    action: str
    result: object = None
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


def folder_fingerprint(path: Path) -> str:
    """Digest of a folder's file names, sizes and modification times (or of one file's), recursively."""
    path = Path(path)
    h = hashlib.sha256()
    entries = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in entries:
        st = p.stat()
        h.update(f"{p.relative_to(path.parent if p == path else path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _params_for_digest(params) -> dict:
    values = asdict(params) if is_dataclass(params) else dict(params)
    return {k: v for k, v in values.items() if k not in RESULT_NEUTRAL}


def _digest(stage: Stage, params, upstream: str) -> str:
    text = json.dumps({"step": stage.step, "params": _params_for_digest(params), "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str))


def _with_options(params, options: dict):
    names = {f.name for f in fields(params)}
    return replace(params, **{k: v for k, v in options.items() if k in names})


def run_stages(stages: list[Stage], state: ChainState, *, configured: dict, options: dict, origin: str,
               rerun_from: str | None = None, until: str | None = None, progress=None, cancel=None,
               on_stage: Callable[[StageOutcome, ChainState], None] | None = None) -> list[StageOutcome]:
    """Run ``stages`` in order with resume records under ``state.out_dir / ".soct"``.

    Parameters
    ----------
    configured : dict
        ``{step name: params dataclass}``; steps not in it use their defaults.
    options : dict
        Run options applied to every step that has them (``workers``, ``memory_budget_gb``, ``if_exists``);
        ``if_exists`` only matters for outputs no record explains.
    origin : str
        Fingerprint of the chain's input (see :func:`folder_fingerprint`).
    rerun_from : str, optional
        Run this stage and every later one even when their records match.
    until : str, optional
        Stop after this stage.
    progress : callable, optional
        ``progress(done, total, message)``, 1000 units per stage.
    on_stage : callable, optional
        ``on_stage(outcome, state)`` after each stage (kept or run), e.g. to show its outputs.
    """
    names = [s.step for s in stages]
    for name, label in ((rerun_from, "from"), (until, "until")):
        if name is not None and name not in names:
            raise ValueError(f"--{label} {name!r}: not a step of this run; the steps are {', '.join(names)}")
    records = state.out_dir / ".soct"
    upstream = origin
    forced = False
    outcomes: list[StageOutcome] = []
    user_if_exists = options.get("if_exists", "error")
    for index, stage in enumerate(stages):
        step = STEPS[stage.step]
        params = _with_options(configured.get(stage.step) or step.params(), options)
        digest = _digest(stage, params, upstream)
        upstream = digest
        forced = forced or stage.step == rerun_from
        record_path, pending_path = records / f"{stage.step}.json", records / f"{stage.step}.pending.json"
        record, pending = _read_json(record_path), _read_json(pending_path)
        where = state.out_dir / stage.folder

        def sub(done, total, message, _i=index, _n=stage.step):
            if progress is not None:
                progress(_i * 1000 + int(1000 * done / max(total, 1)), len(stages) * 1000, f"{_n}: {message}")

        if (not forced and record and record.get("digest") == digest
                and all(Path(p).exists() for p in record.get("outputs", []))):
            state.update_from(record.get("state", {}))
            outcomes.append(StageOutcome(stage.step, "kept", outputs=[Path(p) for p in record["outputs"]]))
            sub(1, 1, "kept (finished earlier with the same inputs and parameters)")
            if on_stage is not None:
                on_stage(outcomes[-1], state)
        else:
            if where != state.out_dir:
                remove_stale_temporaries(where)
            remove_stale_temporaries(state.out_dir)
            if pending and pending.get("digest") == digest and not forced:
                if_exists, action = "skip", "resumed"
            elif record or pending or forced:
                if_exists, action = "overwrite", "ran"
                sub(0, 1, "parameters or inputs changed since the last run: recomputing" if not forced
                    else "recomputing (requested)")
            else:
                if_exists, action = user_if_exists, "ran"
            _write_json(pending_path, {"step": stage.step, "digest": digest})
            run_params = _with_options(params, {"if_exists": if_exists})
            started = time.perf_counter()
            result, outputs = stage.call(step, state, where, dict(params=run_params, progress=sub, cancel=cancel))
            seconds = time.perf_counter() - started
            _write_json(record_path, {
                "step": stage.step, "digest": digest, "params": asdict(params), "state": state.paths(),
                "outputs": [str(p) for p in outputs], "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
            })
            pending_path.unlink(missing_ok=True)
            outcomes.append(StageOutcome(stage.step, action, result, seconds, list(outputs)))
            if on_stage is not None:
                on_stage(outcomes[-1], state)
        if stage.step == until:
            break
    return outcomes
