"""sdcli: Stable Diffusion with the fastest attention kernel that is correct on this GPU.

The public API (see api.py and the README): `load`, `route`, `unroute`, `compile`, `Plan`, and the commands'
`generate`, `compare`, `bench` and `doctor`.
Importing the package is cheap on purpose: they load on first use, and torch and diffusers only inside them.
"""

from sdcli._version import __version__
from sdcli.devices import out_of_memory
from sdcli.errors import SdcliError

API = ("load", "route", "unroute", "compile", "Plan", "generate", "compare", "bench", "doctor", "watch_ctrl_c")

__all__ = ["__version__", "SdcliError", "out_of_memory", *API]


def __getattr__(name: str):
    if name in API:
        from sdcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'sdcli' has no attribute {name!r}")
