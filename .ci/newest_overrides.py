"""Print the requirements of torch and transformers as pyproject.toml states their range, for
``uv pip install --upgrade --override``: ``make test-compat`` then installs the newest
versions the package allows, the rest as pinned in requirements-dev.txt."""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers")


def ranges(pyproject: str) -> list:
    try:
        import tomllib

        project = tomllib.loads(pyproject)["project"]
        specs = list(project["dependencies"]) + [
            s for v in project["optional-dependencies"].values() for s in v
        ]
    except ImportError:  # Python < 3.11: the quoted requirement strings
        specs = re.findall(r'"([A-Za-z0-9_.-]+[^"]*)"', pyproject)
    out = {}
    for spec in specs:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
        if name in PACKAGES:
            out.setdefault(name, spec.replace(" ", ""))
    missing = [p for p in PACKAGES if p not in out]
    if missing:
        sys.exit(f"pyproject.toml states no range for {', '.join(missing)}")
    return [out[p] for p in PACKAGES]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(ranges((root / "pyproject.toml").read_text())))
