"""pofa orchestrator: the control plane (recipes, stage graph, run directory, CLI, tracking)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pofa")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
