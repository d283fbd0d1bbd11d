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

__all__ = ["step_section_toml", "defaults_toml", "load_config"]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def step_section_toml(step: Step) -> str:
    """The ``[step]`` section with every parameter at its default, each preceded by its help as a comment."""
    lines = [f"[{step.name}]", f"# {step.title}: {step.help}"]
    for info in step.param_infos:
        limits = []
        if info.choices:
            limits.append("one of " + ", ".join(map(str, info.choices)))
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
    """A complete config file with every registered step at its defaults."""
    header = "# napari-soct run configuration (generated from the step declarations)\n\n"
    return header + "\n".join(step_section_toml(s) for s in STEPS.values())


def load_config(path) -> dict[str, object]:
    """Read a config file into ``{step name: params dataclass}``.

    Raises
    ------
    ValueError
        On unknown sections or keys and invalid values, naming the file and ``section.key``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    unknown = set(data) - set(STEPS)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(STEPS)}")
    out = {}
    for name, section in data.items():
        try:
            out[name] = params_from_mapping(STEPS[name].params, section, where=f"{name}.")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return out
