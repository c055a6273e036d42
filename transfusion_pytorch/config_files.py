"""Job configuration as small TOML files, validated on load.

A job's configuration is a keyword-only dataclass whose fields carry a `help` string in their
metadata. A TOML file sets some of the fields (flat `key = value` lines); `--key value`
overrides on the command line set more. Every key is checked: an unknown one is an error that
names the closest valid key, a value of the wrong type an error naming the key and the type.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from pathlib import Path

from .config import closest_match

if sys.version_info >= (3, 11):
    import tomllib
else:                                               # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    pass


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in fields_of(cls)}


def closest(key: str, valid) -> str:
    match = closest_match(key, valid, cutoff = 0.5)
    return f"; did you mean '{match}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def allowed(annotation) -> tuple[type, ...]:
    """The plain types a field accepts: `float | None` -> (float, NoneType)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in allowed(arg))
    return (typing.get_origin(annotation) or annotation,)


def check_value(key: str, value, annotation, source: str):
    kinds = allowed(annotation)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{source}: '{key}' must be {type_name(kinds)}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
        return float(value)
    if isinstance(value, list) and tuple in kinds:
        return tuple(value)
    if not isinstance(value, kinds):
        raise ConfigError(f"{source}: '{key}' must be {type_name(kinds)}, got {value!r}")
    return value


def type_name(kinds) -> str:
    return ' or '.join('none' if k is type(None) else k.__name__ for k in kinds)


def from_mapping(cls, mapping: dict, source: str = 'config'):
    """The dataclass `cls` from a dict, every key and type checked."""
    valid, hints = fields_of(cls), field_types(cls)
    values = {}
    for key, value in mapping.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{key}'{closest(key, valid)}")
        values[key] = check_value(key, value, hints[key], source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f'{source}: {error}') from None


def parse_value(key: str, text: str, annotation):
    """A command-line string as the field's type."""
    kinds = allowed(annotation)
    if type(None) in kinds and text.lower() in ('none', 'null'):
        return None
    if bool in kinds:
        if text.lower() in ('true', '1', 'yes', 'on'):
            return True
        if text.lower() in ('false', '0', 'no', 'off'):
            return False
    for kind in (int, float, str):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    raise ConfigError(f"--{key.replace('_', '-')}: expected {type_name(kinds)}, got {text!r}")


def parse_overrides(cls, args: list[str]) -> dict:
    """['--steps', '300', '--lr=1e-3'] -> {'steps': 300, 'lr': 0.001}"""
    valid, hints = fields_of(cls), field_types(cls)
    overrides, index = {}, 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith('--'):
            raise ConfigError(f'expected an override --key value, got {arg!r}')
        key, _, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in valid:
            match = closest_match(key, valid, cutoff = 0.5)
            hint = f"; did you mean '--{match.replace('_', '-')}'?" if match else '; see --help for the valid options'
            raise ConfigError(f"unknown option '--{key.replace('_', '-')}'{hint}")
        if not _:
            if index + 1 >= len(args):
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
            index, text = index + 1, args[index + 1]
        overrides[key] = parse_value(key, text, hints[key])
        index += 1
    return overrides


def load(cls, path: str | Path | None = None, overrides: dict | None = None):
    """`cls` from the TOML file at `path` (if any), then `overrides`."""
    mapping, source = {}, 'defaults'
    if path is not None:
        path, source = Path(path), str(path)
        if not path.exists():
            raise ConfigError(f'config file {path} does not exist')
        try:
            mapping = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f'{path}: not valid TOML: {error}') from None
        for key, value in mapping.items():
            if isinstance(value, dict):
                raise ConfigError(f"{path}: '{key}' is a table; the config is flat key = value lines{closest(key, fields_of(cls))}")
    if overrides:                               # where the values came from, for errors: the file, the command line or both
        source = 'the command line' if path is None else f'{path} with the command line'
    mapping.update(overrides or {})
    return from_mapping(cls, mapping, source)


def to_toml(config) -> str:
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue                            # TOML has no null: a missing key is the default
        help_text = f.metadata.get('help')
        if help_text:
            lines.append(f'# {help_text}')
        lines.append(f'{f.name} = {toml_value(value)}')
    return '\n'.join(lines) + '\n'


def write_text_atomic(path: Path, text: str):
    """Writes `text` to `path` under a temporary name, then renames it into place: a kill
    mid-write leaves the old file, never half a new one."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return '"' + value.replace('\\', '\\\\').replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return '[' + ', '.join(toml_value(v) for v in value) + ']'
    return repr(value)


def describe(cls) -> str:
    """One line per key: name, default and help, for --help (a help that states its own default,
    one that depends on other keys, keeps it)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get('help', '')
        lines.append(f"  --{f.name.replace('_', '-'):<22} {help_text}" + ('' if re.search(r'\bdefault[: ]', help_text) else f' (default: {default})'))
    return '\n'.join(lines)
