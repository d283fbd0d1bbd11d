"""Declaring step parameters once.

A step's parameters are a dataclass whose fields carry their help text and bounds (built with :func:`param`).
The napari widget, the command-line options and the config-file section are all derived from it, so a
parameter is named, defaulted and documented in exactly one place.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field, fields

__all__ = ["param", "ParamInfo", "param_infos", "validate_params", "params_from_mapping"]


def param(default, help: str, *, min=None, max=None, choices=None, unit: str = "", advanced: bool = False):
    """A dataclass field with its help text and constraints.

    Parameters
    ----------
    default
        Default value (its type is the field's annotation).
    help : str
        One sentence shown as tooltip, ``--help`` text and config comment.
    min, max : number, optional
        Inclusive bounds for numeric parameters.
    choices : sequence of str, optional
        Allowed values for string parameters.
    unit : str
        Unit shown next to the value.
    advanced : bool
        Hidden behind an "advanced" toggle in widgets.
    """
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None, "unit": unit,
            "advanced": advanced}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamInfo:
    """Everything known about one parameter, read from the dataclass field."""

    name: str
    type: type
    default: object
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    unit: str = ""
    advanced: bool = False

    def validate(self, value, where: str = ""):
        """Coerce ``value`` to the parameter type and check bounds; raise ValueError naming the parameter."""
        label = f"{where}{self.name}"
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = low in ("true", "1", "yes")
                elif not isinstance(value, bool | int):
                    raise ValueError
                value = bool(value)
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif self.type is str:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter '{label}': {value!r} is not a valid {self.type.__name__}") from None
        if self.min is not None and value < self.min:
            raise ValueError(f"parameter '{label}': {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"parameter '{label}': {value} is above the maximum {self.max}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter '{label}': {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


def param_infos(params_cls) -> list[ParamInfo]:
    """The :class:`ParamInfo` of each field of a parameter dataclass, in declaration order."""
    hints = typing.get_type_hints(params_cls)
    out = []
    for f in fields(params_cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        meta = f.metadata
        out.append(
            ParamInfo(
                name=f.name,
                type=hints[f.name],
                default=default,
                help=meta.get("help", ""),
                min=meta.get("min"),
                max=meta.get("max"),
                choices=meta.get("choices"),
                unit=meta.get("unit", ""),
                advanced=meta.get("advanced", False),
            )
        )
    return out


def validate_params(params) -> None:
    """Check every field of a parameter dataclass instance against its declaration."""
    for info in param_infos(type(params)):
        info.validate(getattr(params, info.name))


def params_from_mapping(params_cls, mapping: dict, where: str = ""):
    """Build a parameter dataclass from a mapping, rejecting unknown keys and invalid values by name."""
    infos = {i.name: i for i in param_infos(params_cls)}
    unknown = set(mapping) - set(infos)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(f'{where}{k}' for k in sorted(unknown))}; "
            f"known: {', '.join(infos)}"
        )
    values = {k: infos[k].validate(v, where) for k, v in mapping.items()}
    return dataclasses.replace(params_cls(), **values)
