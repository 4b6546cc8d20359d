"""Every wheel the image installs, into deploy/wheels/, for a build with no network.

    python3 deploy/wheelhouse.py PYTHON_VERSION      # the base image's, e.g. 3.11.2

deploy/requirements.txt (exported from uv.lock) is fully pinned with hashes; its markers are
evaluated for the image's Python, not this machine's (redis needs async-timeout below 3.11.3),
and each wheel is downloaded without resolving again. Then hatchling, which builds speechgate's
own wheel inside the image.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

DEPLOY = Path(__file__).parent


def wanted(requirements: str, python: str) -> list[str]:
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python}
    out = []
    for block in requirements.replace("\\\n", " ").splitlines():
        line = block.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split("--hash=")
        requirement = Requirement(spec.strip())
        if requirement.marker is None or Marker(str(requirement.marker)).evaluate(env):
            requirement.marker = None
            out.append(f"{requirement} " + " ".join(f"--hash={h.strip()}" for h in hashes))
    return out


def main() -> None:
    python = sys.argv[1]
    lines = wanted((DEPLOY / "requirements.txt").read_text(), python)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pinned:
        pinned.write("\n".join(lines) + "\n")
        pinned.flush()
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--dest"]
        subprocess.run([*pip, str(DEPLOY / "wheels"), "--no-deps", "-r", pinned.name], check=True)
    subprocess.run([*pip, str(DEPLOY / "wheels"), "hatchling"], check=True)
    print(f"{len(list((DEPLOY / 'wheels').glob('*.whl')))} wheels in {DEPLOY / 'wheels'} for Python {python}")


if __name__ == "__main__":
    main()
