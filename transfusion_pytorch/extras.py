"""Optional dependencies: imported where they are used, with an error that says what needs
them and which extra installs them, instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, purpose: str, extra: str = 'data') -> ModuleType:
    """`importlib.import_module(module)`, or an ImportError naming `purpose` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split('.')[0]
        raise ImportError(f"{purpose} needs {package}, which is not installed ({error}): "
                          f"pip install 'transfusion-pytorch[{extra}]'") from None
