"""Write the shell completion scripts into completions/ (or, with --check, fail if they are stale).

The scripts are what typer generates for `sdcli`; they call `sdcli` back for the actual words, so
they only go stale when the program name or typer's templates change.
"""

import os
import subprocess
import sys
from pathlib import Path

FILES = {"bash": "sdcli.bash", "zsh": "_sdcli", "fish": "sdcli.fish"}
ROOT = Path(__file__).resolve().parent.parent


def script(shell: str) -> str:
    env = {**os.environ, "_SDCLI_COMPLETE": f"source_{shell}"}
    cmd = [sys.executable, "-c", "from sdcli.cli import app; app(prog_name='sdcli')"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def main(check: bool) -> int:
    stale = []
    for shell, name in FILES.items():
        path = ROOT / "completions" / name
        text = script(shell)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale completion scripts (run python scripts/completions.py):", *stale, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
