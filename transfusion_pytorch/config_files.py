"""Job configuration as small TOML files, validated on load.

A job's configuration is a keyword-only dataclass whose fields carry a `help` string in their
metadata. A TOML file sets some of the fields (flat `key = value` lines); `--key value`
overrides on the command line set more. Every key is checked: an unknown one is an error that
names the closest valid key, a value of the wrong type an error naming the key and the type.

A run folder's config.toml records every key, its `format_version` (`versions.py`) and the keys
left at none (`none_keys`: TOML has no null). Read back, a key it lacks takes the default of its
version, and a rerun goes on with the defaults its run was made with (`check_rerun`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

from .config import closest_match
from .versions import FORMAT_VERSION, changed_since, check_version

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
        kinds = item_types(annotation, len(value), f"{source}: '{key}'")
        return tuple(check_value(f'{key}[{i}]', item, kind, source) for i, (item, kind) in enumerate(zip(value, kinds)))
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


def tuple_type(annotation):
    """The tuple among the types a field accepts (`tuple[float, ...]` in `tuple[float, ...] | None`), else None."""
    members = typing.get_args(annotation) if tuple not in (annotation, typing.get_origin(annotation)) else (annotation,)
    return next((m for m in members if m is tuple or typing.get_origin(m) is tuple), None)


def item_types(annotation, length: int, where: str) -> list:
    """The types of the items of a tuple of `length` items for the field's tuple type: `tuple[float, ...]`
    types each item float, `tuple[int, str]` the two in turn."""
    args = typing.get_args(tuple_type(annotation))
    kinds = [object] * length if not args else [args[0]] * length if args[-1] is Ellipsis else list(args)
    if len(kinds) != length:
        raise ConfigError(f'{where}: expected {len(kinds)} items, got {length}')
    return kinds


def parse_value(key: str, text: str, annotation):
    """A command-line string as the field's type. A tuple is read from comma-separated items, as a
    TOML array gives it, except a tuple of strings that the field also takes as text: the field
    splits it by its own rule (`prompts` at '|', as captions hold commas)."""
    kinds = allowed(annotation)
    if type(None) in kinds and text.lower() in ('none', 'null'):
        return None
    if tuple in kinds and not (str in kinds and str in typing.get_args(tuple_type(annotation))):
        return parse_tuple(key, text, annotation)
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


def parse_tuple(key: str, text: str, annotation) -> tuple:
    """'1,2' -> (1.0, 2.0) for a `tuple[float, ...]` field."""
    items = [item.strip() for item in text.split(',')] if text.strip() else []
    try:
        return tuple(parse_value(key, item, kind) for item, kind in zip(items, item_types(annotation, len(items), key)))
    except ConfigError:
        args = typing.get_args(tuple_type(annotation))
        kinds = f"{type_name(args[:1])}s" if args and args[-1] is Ellipsis else ', '.join(type_name((k,)) for k in args) or 'items'
        raise ConfigError(f"--{key.replace('_', '-')}: expected {kinds}, separated by commas, got {text!r}") from None


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


def read_toml(cls, path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f'config file {path} does not exist')
    try:
        mapping = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f'{path}: not valid TOML: {error}') from None
    for key, value in mapping.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: '{key}' is a table; the config is flat key = value lines{closest(key, fields_of(cls))}")
    return mapping


def as_saved(cls, mapping: dict, source: str, unversioned: int) -> tuple[dict, int]:
    """(the keys of `mapping`, its format version): `none_keys` set to None, and each key it lacks
    whose default changed after its version at the old default. A mapping without `format_version`
    is of version `unversioned`."""
    mapping, valid, hints = dict(mapping), fields_of(cls), field_types(cls)
    version = check_version(mapping.pop('format_version', unversioned), source, ConfigError)
    nones = mapping.pop('none_keys', [])
    if not (isinstance(nones, list) and all(isinstance(key, str) for key in nones)):
        raise ConfigError(f"{source}: 'none_keys' must be a list of keys (those left at none), got {nones!r}")
    for key in nones:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{key}' in none_keys{closest(key, valid)}")
        if type(None) not in allowed(hints[key]) or key in mapping:
            raise ConfigError(f"{source}: '{key}' is in none_keys, and " + (f'set to {mapping[key]!r}' if key in mapping else 'cannot be none'))
        mapping[key] = None
    for change in changed_since(version, valid):
        mapping.setdefault(change.key, change.old)
    return mapping, version


def load(cls, path: str | Path | None = None, overrides: dict | None = None):
    """`cls` from the TOML file at `path` (if any), then `overrides`. A file that records no
    `format_version` is read at today's defaults (a run folder's config.toml: `load_saved`)."""
    mapping, source = {}, 'defaults'
    if path is not None:
        mapping, _ = as_saved(cls, read_toml(cls, path), str(path), unversioned = FORMAT_VERSION)
        source = str(path)
    if overrides:                               # where the values came from, for errors: the file, the command line or both
        source = 'the command line' if path is None else f'{path} with the command line'
    mapping.update(overrides or {})
    return from_mapping(cls, mapping, source)


def load_saved(cls, path: str | Path) -> tuple[object, int]:
    """(the config of a run folder's config.toml, its format version): one that records no
    `format_version` was written before versions were, and is read at the defaults of then."""
    mapping, version = as_saved(cls, read_toml(cls, path), str(path), unversioned = 0)
    return from_mapping(cls, mapping, str(path)), version


def to_toml(config, version: int = FORMAT_VERSION) -> str:
    """Every key of `config`, with the format version of its defaults (a resumed run keeps its own)."""
    nones = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None]
    lines = ['# the version of the defaults this run was made with (see transfusion_pytorch/versions.py)',
             f'format_version = {version}', '# the keys left at none (TOML has no null)', f'none_keys = {toml_value(nones)}']
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        help_text = f.metadata.get('help')
        if help_text:
            lines.append(f'# {help_text}')
        lines.append(f'{f.name} = {toml_value(value)}')
    return '\n'.join(lines) + '\n'


def check_rerun(config, rerun_keys: tuple[str, ...]) -> tuple[object, int]:
    """A rerun resumes the run in `config.run_dir`: refused when it would change what that run is.
    Returns the config the run goes on with (`keep_defaults`) and the run's format version
    (today's for a new run)."""
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f'the run folder {run_dir} is a file')
    if not (run_dir / 'config.toml').exists():
        return config, FORMAT_VERSION
    saved, version = load_saved(type(config), run_dir / 'config.toml')
    config = keep_defaults(config, saved, version)
    ignored = set(rerun_keys) | {'name', 'out_root'}        # name and out_root: where the run is, not what it is
    changed = [f'{f.name} = {getattr(saved, f.name)!r} in the run, {getattr(config, f.name)!r} now'
               for f in dataclasses.fields(config) if f.name not in ignored and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(changed)}). A rerun resumes that run "
                          f"and may change only {', '.join(rerun_keys)}: use another --name, or delete the folder to start over")
    return config, version


def keep_defaults(config, saved, version: int):
    """`config`, where it has today's default of a key whose default changed after the run's
    version and the run the old one, with the run's: a rerun goes on as its run was made (noted)."""
    kept = {}
    for change in changed_since(version, fields_of(type(config))):
        if getattr(saved, change.key) == change.old and getattr(config, change.key) == change.new:
            kept[change.key] = change.old
            warnings.warn(f'{config.run_dir} was made with {change.key} = {change.old!r}, the default before format version '
                          f'{change.version}: the rerun keeps it (the default is now {change.new!r}: {change.why}); '
                          f'a new run (another --name) takes the new default', stacklevel = 2)
    return dataclasses.replace(config, **kept) if kept else config


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
