"""Locate data files shipped inside installed packages, without importing those packages."""

import importlib.util
from pathlib import Path

from fedcrm.exceptions import DataPackageMissing


def package_file(package: str, relative: str) -> Path:
    """Return the path of ``relative`` inside the installed ``package``.

    ``find_spec`` does not execute the package's ``__init__``, so heavy packages stay unloaded.

    Raises:
        DataPackageMissing: The package or the file is not installed; says what to install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataPackageMissing(
            f"package {package!r} is not installed; run `make install` (it ships the data set)"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DataPackageMissing(f"{package} is installed but has no {relative!r}")
    return path
