"""Import a script under scripts/ as a module for the duration of a test module."""

import contextlib
import importlib.util
import sys
from pathlib import Path


@contextlib.contextmanager
def loaded_script(path: Path, name: str):
    """Yield the script at ``path`` imported as module ``name``, removed from sys.modules afterwards."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the defining module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
