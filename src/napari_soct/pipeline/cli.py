"""``napari-soct`` command line: one sub-command per registered step, plus ``run``, ``synth``, ``demo`` and
``config``.

Options of a step sub-command are generated from its parameter dataclass; values come from the defaults,
then the step's section of ``--config FILE``, then the options given on the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..processing.params import ParamInfo
from .steps import STEPS, Step

__all__ = ["main", "build_parser"]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_param_option(parser: argparse.ArgumentParser, info: ParamInfo) -> None:
    unit = f" [{info.unit}]" if info.unit else ""
    help_text = f"{info.help}{unit} (default: {info.default})"
    if info.type is bool:
        parser.add_argument(_option(info.name), dest=info.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
        return
    parser.add_argument(_option(info.name), dest=info.name, type=str, default=argparse.SUPPRESS,
                        metavar=info.type.__name__.upper() if not info.choices else "{" + ",".join(info.choices) + "}",
                        help=help_text)


class _ProgressPrinter:
    """Prints progress to stderr: one updating line on a terminal, a line every 10 % in logs."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet, self._last, self._decile = label, quiet, 0.0, -1
        self._tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.quiet:
            return
        if not self._tty:
            decile = 10 * done // max(total, 1)
            if decile != self._decile:
                self._decile = decile
                print(f"{self.label}: {done}/{total} {message}", file=sys.stderr, flush=True)
            return
        now = time.monotonic()
        if now - self._last < 0.5 and done < total:
            return
        self._last = now
        print(f"\r{self.label}: {done}/{total} {message[:60]:<60}", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)


#: Words that leave an optional input empty on the command line (a positional argument cannot be left out).
EMPTY_WORDS = ("", "none")


def _optional_path(text: str):
    """An optional input's argument: ``""`` (what the step function takes as "none") or a path."""
    return "" if text.strip().lower() in EMPTY_WORDS else Path(text)


def _add_step_parser(sub, step: Step) -> None:
    parser = sub.add_parser(step.name, help=step.title, description=step.help)
    for inp in step.inputs:
        if inp.optional:
            parser.add_argument(inp.name, type=_optional_path, metavar=inp.name.upper(),
                                help=f"{inp.help} (optional: give '' or none to leave it empty)")
        else:
            parser.add_argument(inp.name, type=Path, metavar=inp.name.upper(), help=inp.help)
    parser.add_argument("--config", type=Path, help=f"TOML config file; its [{step.name}] section sets defaults")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    group = parser.add_argument_group("step parameters")
    for info in step.param_infos:
        _add_param_option(group, info)
    parser.set_defaults(handler=lambda args: _run_step(step, args))


def _step_params(step: Step, args: argparse.Namespace):
    from .config import load_config

    params = step.params()
    if args.config is not None:
        params = load_config(args.config).get(step.name, params)
    given = {i.name: i.validate(getattr(args, i.name), "--") for i in step.param_infos if hasattr(args, i.name)}
    return replace(params, **given)


def _run_step(step: Step, args: argparse.Namespace) -> int:
    from ..processing.io.images import open_image

    params = _step_params(step, args)
    inputs = [open_image(getattr(args, i.name)) if i.is_array else getattr(args, i.name) for i in step.inputs]
    result = step.run(*inputs, params=params, progress=_ProgressPrinter(step.name, args.quiet))
    print(step.summary(result))
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    from ..processing.synthetic import make_acquisition

    acq = make_acquisition(args.out_dir, preset=args.preset, seed=args.seed,
                           progress=_ProgressPrinter("synth", args.quiet))
    print(f"synthetic acquisition '{args.preset}' (seed {args.seed}):")
    print(f"  raw tiles:    {acq.raw_dir}")
    print(f"  ground truth: {acq.truth_dir}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from ..processing.synthetic import make_acquisition

    out = Path(args.out_dir)
    print(f"1/3 making the synthetic acquisition '{args.preset}' in {out / 'synthetic'}", file=sys.stderr)
    acq = make_acquisition(out / "synthetic", preset=args.preset, seed=args.seed,
                           progress=_ProgressPrinter("synth", args.quiet))
    print(f"2/3 preprocessing into {out / 'preprocess'}", file=sys.stderr)
    step = STEPS["preprocess"]
    result = step.run(acq.raw_dir, out / "preprocess", params=step.params(),
                      progress=_ProgressPrinter("preprocess", args.quiet))
    print(f"3/3 reconstructing (steps 1-16 and the report) into {out / 'reconstruct'}", file=sys.stderr)
    chain = STEPS["reconstruct"]
    slices = chain.run(out / "preprocess", out / "reconstruct", params=chain.params(),
                       progress=_ProgressPrinter("reconstruct", args.quiet))
    print("napari-soct demo finished.")
    print(f"  raw tiles:      {acq.raw_dir}")
    print(f"  ground truth:   {acq.truth_dir}")
    print(step.summary(result))
    print(f"  QC previews:    {out / 'preprocess' / 'previews'}")
    print(chain.summary(slices))
    shown = slices.volume or slices.paths[0]
    print(f"Open in napari:   napari {acq.raw_dir}   or   napari {shown}")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import load_run_file
    from .runner import run_pipeline

    run, configured = load_run_file(args.run_file)
    overrides = {k: v for k, v in (("scheduler", args.scheduler), ("workers", args.workers)) if v is not None}
    run = replace(run, **overrides)
    result = run_pipeline(run, step_params=configured, rerun_from=args.from_step, until=args.until,
                          progress=_ProgressPrinter("run", args.quiet))
    for o in result.outcomes:
        state = {"kept": "kept (finished earlier)", "resumed": "resumed", "ran": "ran"}[o.action]
        print(f"  {o.step:14s} {state}" + (f" in {o.seconds:.1f} s" if o.action != "kept" else ""))
    print(f"run finished in {result.seconds:.1f} s into {result.out_dir}")
    if result.volume is not None:
        print(f"  volume: {result.volume}")
    if result.report is not None:
        print(f"  report: {result.report}")
    return 0


def _run_config(args: argparse.Namespace) -> int:
    from .config import defaults_toml, load_config

    if args.check is not None:
        load_config(args.check)
        print(f"{args.check}: valid")
        return 0
    print(defaults_toml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-soct", description="Serial OCT reconstruction: the napari-soct steps on the command line."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from ..processing.synthetic import PRESETS

    for name, handler, help_text in (
        ("synth", _run_synth, "write a synthetic acquisition with ground truth"),
        ("demo", _run_demo, "make a synthetic acquisition and take it through every step available"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
        p.add_argument("--preset", choices=list(PRESETS), default="small" if name == "demo" else "tiny")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(handler=handler)
    p = sub.add_parser("run", help="run everything from raw tiles to the volume, as a run file says (resumable)",
                       description="Preprocessing, reconstruction (steps 1-16) and the report, as RUN_FILE says "
                       "(make one with `napari-soct config --defaults > run.toml`). Re-running keeps finished "
                       "steps whose inputs and parameters did not change.")
    p.add_argument("run_file", type=Path, metavar="RUN_FILE")
    p.add_argument("--from", dest="from_step", metavar="STEP", help="recompute from this step on")
    p.add_argument("--until", metavar="STEP", help="stop after this step")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="'local' (a LocalCluster, default), 'threads', or a dask scheduler address tcp://host:port")
    p.add_argument("--workers", type=int, metavar="N", help="parallel slices (local cluster processes)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_run_pipeline)
    p = sub.add_parser("config", help="print a config file with every step's defaults, or check one")
    p.add_argument("--defaults", action="store_true", help="print the defaults (the default action)")
    p.add_argument("--check", type=Path, metavar="FILE", help="validate a config file")
    p.set_defaults(handler=_run_config)
    for step in STEPS.values():
        _add_step_parser(sub, step)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-soct`` command."""
    from ..processing.io.atomic import OutputExistsError
    from ..processing.io.rawtiles import RawFormatError
    from ..processing.progress import Cancelled

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (RawFormatError, OutputExistsError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"\nnapari-soct {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print(f"\nnapari-soct {args.command}: cancelled; partial outputs removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
