"""The format version of saved configs, and the defaults that changed between versions.

A run folder's `config.toml` and a saved model's `config.json` record `format_version` and every
key, defaults included. Read back, a key that a file lacks takes the default of the file's version:
for each change below made after it, the old default, so that a run or a model saved before a
default changed keeps its old behaviour (with a note). A saved file without `format_version` was
written before versions were recorded: version 0.

Changing a default: raise FORMAT_VERSION and add a row to DEFAULT_CHANGES with the new version.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1


@dataclass(frozen = True)
class DefaultChange:
    key: str
    old: object         # the default of files saved before `version`
    new: object
    version: int        # the first format version with the new default
    why: str


DEFAULT_CHANGES = (
    DefaultChange('time_distribution', 'uniform', 'logit_normal', 1,
                  'logit-normal times (Esser et al., 2024) train more of them mid-path; better drawings on the digits demo'),
    DefaultChange('min_time_before_text', 0., 0.5, 1,
                  'a picture that text follows is noised at most half way (Transfusion, section 4.3); better captions on the digits demo'),
)


def check_version(version, source: str, error = ValueError) -> int:
    """`version` as read from `source`: an int from 0 up to FORMAT_VERSION."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise error(f'{source}: format_version must be an int >= 0, got {version!r}')
    if version > FORMAT_VERSION:
        raise error(f'{source} was written with format version {version}, newer than this transfusion-pytorch reads '
                    f'(format version {FORMAT_VERSION}): upgrade transfusion-pytorch to load it')
    return version


def changed_since(version: int, keys) -> list[DefaultChange]:
    """The changes of defaults among `keys` made after `version`."""
    return [change for change in DEFAULT_CHANGES if change.version > version and change.key in keys]
