"""sdcli's Python API: what the `sdcli` commands do, for a script or service that has its own pipeline.

    import sdcli
    report = sdcli.doctor()                 # the machine and every backend's verdict, as a dict
"""

from __future__ import annotations

from pathlib import Path


def doctor(device: str | None = None, dtype: str | None = None, probe: bool = False, report: str | Path | None = None,
           on_progress=None) -> dict:
    """What this machine (or a saved `report`) can run: the same dict as `sdcli doctor --json`, with keys
    report, verdicts, probe (with `probe=True`: each usable backend measured at SD's shapes) and plans."""
    from sdcli import doctor as diagnosis

    return diagnosis.diagnose(Path(report) if report else None, probe, device, dtype, on_progress)
