"""The install: ranges in pyproject.toml, the one tested set in constraints.txt, no conflicts."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]


def requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) of the core dependencies and of every extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        found += [(f"extra {extra}", Requirement(r)) for r in items]
    return found


def lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_dependencies_are_ranges_and_the_lock_satisfies_them():
    pins = lock()
    for where, req in requirements():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{where}: {req} is an exact pin"
        if req.marker is None and canonicalize_name(req.name) in pins:
            # pre-releases and local versions (torch's "+cpu") count as inside a range
            assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), \
                f"constraints.txt pins {req.name}=={pins[canonicalize_name(req.name)]}, outside {where}'s {req}"
    for where, req in requirements():
        if where in ("dependencies", "extra dev", "extra torch", "extra tfds", "extra export"):
            assert canonicalize_name(req.name) in pins, f"{where}: {req.name} is not in constraints.txt"


def test_installed_packages_do_not_conflict():
    """`pip check`: every installed distribution's requirements are met, so the extras
    did not downgrade anything another package (the core included) needs."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
