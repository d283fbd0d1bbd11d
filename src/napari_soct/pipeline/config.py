"""Config files (TOML): one section per step, generated from the step declarations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..processing.params import params_from_mapping
from .steps import STEPS, Step

__all__ = ["step_section_toml", "defaults_toml", "load_config", "load_run_file", "RUN_SECTION"]

RUN_SECTION = "run"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def step_section_toml(step: Step) -> str:
    """The ``[step]`` section with every parameter at its default, each preceded by its help as a comment."""
    return _section_toml(step.name, f"{step.title}: {step.help}", step.param_infos)


def _section_toml(name: str, title: str, infos) -> str:
    lines = [f"[{name}]", f"# {title}"]
    for info in infos:
        limits = []
        if info.choices:
            limits.append("one of " + ", ".join(repr(c) if c == "" else str(c) for c in info.choices))
        if info.min is not None:
            limits.append(f">= {info.min}")
        if info.max is not None:
            limits.append(f"<= {info.max}")
        unit = f" [{info.unit}]" if info.unit else ""
        extra = f" ({'; '.join(limits)})" if limits else ""
        lines.append(f"# {info.help}{unit}{extra}")
        lines.append(f"{info.name} = {_toml_value(info.default)}")
    return "\n".join(lines) + "\n"


def defaults_toml() -> str:
    """A complete run file: the ``[run]`` section and every registered step at its defaults."""
    from ..processing.params import param_infos
    from .runner import RunParams

    header = ("# napari-soct run file (generated from the step declarations): napari-soct run THIS_FILE\n"
              "# Delete what you do not change; unknown keys and out-of-range values are rejected.\n\n")
    run = _section_toml(RUN_SECTION, "The run: folders, optional steps, profile, where it runs",
                        param_infos(RunParams))
    return header + run + "\n" + "\n".join(step_section_toml(s) for s in STEPS.values())


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None


def _step_sections(path: Path, data: dict, base: dict | None = None) -> dict[str, object]:
    unknown = set(data) - set(STEPS) - {RUN_SECTION}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; known: "
                         f"{RUN_SECTION}, {', '.join(STEPS)}")
    out = {}
    for name in sorted(set(data) | set(base or {}), key=lambda n: list(STEPS).index(n) if n in STEPS else -1):
        if name == RUN_SECTION:
            continue
        merged = {**(base or {}).get(name, {}), **data.get(name, {})}
        try:
            out[name] = params_from_mapping(STEPS[name].params, merged, where=f"{name}.")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return out


def load_config(path) -> dict[str, object]:
    """Read a config file's step sections into ``{step name: params dataclass}`` (a ``[run]`` section is
    ignored here, see :func:`load_run_file`).

    Raises
    ------
    ValueError
        On unknown sections or keys and invalid values, naming the file and ``section.key``.
    """
    path = Path(path)
    return _step_sections(path, _read_toml(path))


def load_run_file(path):
    """Read a run file: ``(RunParams, {step name: params})``, its profile applied under the file's values.

    Folders in ``[run]`` given relative are taken relative to the file.
    """
    from .runner import PROFILES, RunParams

    path = Path(path)
    data = _read_toml(path)
    run_section = dict(data.get(RUN_SECTION, {}))
    profile = run_section.get("profile", "")
    if profile and profile not in PROFILES:
        raise ValueError(f"{path}: run.profile: unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    base = PROFILES.get(profile, {}) if profile else {}
    run_values = {**base.get(RUN_SECTION, {}), **run_section}
    for key in ("raw_dir", "out_dir", "atlas_template", "config_file"):
        if run_values.get(key) and not Path(run_values[key]).is_absolute():
            run_values[key] = str((path.parent / run_values[key]).resolve())
    try:
        run = params_from_mapping(RunParams, run_values, where=f"{RUN_SECTION}.")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return run, _step_sections(path, data, base)
