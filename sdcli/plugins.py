"""The plug-in contract: how a package adds attention backends to sdcli, the way sdcli adds its own.

A package declares an entry point in the group `sdcli.backends`, naming a `sdcli.backends.Backend`, a list of them,
or a function that returns either:

    [project.entry-points."sdcli.backends"]
    my-kernel = "my_kernel.sdcli_plugin:backend"

sdcli's own backends are one such source (`sdcli.builtins:backends`), loaded first and in the same way, so a
built-in backend is a declaration like any plug-in's (sdcli.backends says what a declaration holds). A plug-in's
`origin` is its distribution, and its `release` (the distribution's version, plus a hash of its module files when
it is installed editable) keys auto's measured plans.
"""

from __future__ import annotations

import importlib.metadata

GROUP = "sdcli.backends"
BUILTINS = importlib.metadata.EntryPoint(name="sdcli", value="sdcli.builtins:backends", group=GROUP)


def sources() -> list:
    """Where backends come from: sdcli's own declarations, then every installed plug-in's entry point."""
    return [BUILTINS, *importlib.metadata.entry_points(group=GROUP)]


def declared(obj) -> list:
    """What an entry point names, as a list: a Backend, a list or tuple of them, or a function returning either."""
    items = obj() if callable(obj) else obj
    return list(items) if isinstance(items, (list, tuple)) else [items]


def release(ep) -> str | None:
    """A plug-in's version, for auto's plan key: its distribution's version, plus a hash of its module files
    when it is installed editable (its code then changes without a new version)."""
    import hashlib
    import json
    import sys
    from pathlib import Path

    version = ep.dist.version if ep.dist else None
    try:
        editable = json.loads(ep.dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
    except (AttributeError, ValueError):
        editable = False
    if not editable:
        return version
    module = sys.modules[ep.module.split(".")[0]]  # loaded by ep.load()
    roots = [Path(p) for p in getattr(module, "__path__", [])] or [Path(module.__file__)]
    files = sorted(f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py")))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return f"{version}+src.{digest}"
