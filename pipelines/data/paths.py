"""Resolving user-given source paths, including files shipped inside installed packages."""
from __future__ import annotations

import importlib.util
import os

PKG_SCHEME = "pkg://"


def resolve_source_path(path: str) -> str:
    """`pkg://gensim/test/test_data/x.bz2` -> the file inside the installed `gensim` package.

    Used by the offline demo so it reads the real Wikipedia fragment that gensim ships, not a copy.
    """
    if not path.startswith(PKG_SCHEME):
        return os.path.expanduser(path)
    package, _, rel = path[len(PKG_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{path!r}: package {package!r} is not installed")
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, rel)
