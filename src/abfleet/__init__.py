"""abfleet: abliteration jobs on rented GPUs or locally."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("abfleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
