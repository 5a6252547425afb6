"""Config files, read and written one way everywhere: TOML in (:func:`read_toml`), TOML out
(:func:`dumps_toml`, strings escaped as JSON strings, which TOML accepts), and one check that a
table holds only known keys (:func:`reject_unknown`), so a typo in any config fails with one line
that names it."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from medveil.errors import ConfigError

T = TypeVar("T")


def reject_unknown(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """One line naming every key of ``given`` that is not in ``known`` (and the known ones)."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def dataclass_from_dict(cls: type[T], d: Mapping[str, Any], where: str) -> T:
    """``cls(**d)`` after :func:`reject_unknown` on the dataclass's fields."""
    reject_unknown(d, (f.name for f in fields(cls)), where)  # type: ignore[arg-type]
    try:
        return cls(**d)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or invalid file is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def apply_overrides(raw: dict[str, Any], items: Iterable[str], where: str = "--set") -> dict[str, Any]:
    """``raw`` with each "KEY=VALUE" or "SECTION.KEY=VALUE" of ``items`` set (a copy; ``raw`` is
    unchanged). VALUE is read as a TOML value (0, 1e-3, true, [1, 2], "text"), else kept as the
    plain string it is (``federation.strategy=fedavg``). Unknown keys are the config loader's to
    reject, with the known ones named."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for item in items:
        name, sep, text = item.partition("=")
        parts = name.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2:
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE or SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        if len(parts) == 1:
            out[parts[0]] = value
        elif isinstance(out.setdefault(parts[0], {}), Mapping):
            out[parts[0]][parts[1]] = value
        else:
            raise ConfigError(f"{where} {item!r}: {parts[0]!r} is a value, not a [section]")
    return out


def toml_value(v: Any) -> str:
    """One TOML value: booleans, integers, floats (inf / nan spelled as TOML does), strings (as
    JSON strings: every escape TOML needs) and arrays of these."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} {v!r} to TOML")


def dumps_toml(d: Mapping[str, Any]) -> str:
    """Scalars and arrays at the top, then one ``[table]`` per dict value and one ``[[name]]``
    per item of a list of dicts (one level of nesting: what MedVeil's configs use)."""
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)

    lines = [f"{k} = {toml_value(v)}" for k, v in d.items()
             if not isinstance(v, Mapping) and not is_table_array(v)]
    for k, v in d.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    for k, v in d.items():
        if is_table_array(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines).lstrip("\n") + "\n"
