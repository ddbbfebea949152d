"""The libraries sdcli drives (diffusers, transformers, huggingface_hub), imported without their own notices."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """transformers and diffusers log optional-dependency notices at import; sdcli's output stays clean."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    import huggingface_hub

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
