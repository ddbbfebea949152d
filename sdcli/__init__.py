"""sdcli: Stable Diffusion with the fastest attention kernel that is correct on this GPU.

Importing the package is cheap on purpose: torch and diffusers load only in the modules that need them.
"""

__version__ = "0.1.0"


class SdcliError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""

    exit_code = 2
