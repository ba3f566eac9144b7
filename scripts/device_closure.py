"""Check that the wheels in a folder, installed with --no-deps on the GPU machine, have what they need.

    python scripts/device_closure.py .whl

Every ``Requires-Dist`` of every carried wheel (markers evaluated for CPython 3.12 on Linux
x86_64, no extras) must be met by another carried wheel or by a package of the machine's image
(``scripts/device-packages.txt``); where both versions are known, the version must match the
specifier. A carried wheel replaces the machine's copy (it comes first on PYTHONPATH). Prints
what it checked; exits 1 on a missing package or two wheels of one name (pip would refuse them).
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MACHINE = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "implementation_name": "cpython", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "extra": ""}
# Needed only to build or for optional paths that the check never takes.
NOT_AT_RUNTIME = {"maturin", "ninja"}
# Exact pins that are a packaging choice, not an API need: the machine's version is used.
# GPTQModel 7.6 pins numpy==2.2.6; the machine's torch and its other packages are built on its numpy.
ACCEPTED = {("gptqmodel", "numpy")}


def machine_packages(path: Path) -> dict[str, Version | None]:
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(z.read(meta).decode())
    reqs = [Requirement(r) for r in headers.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(MACHINE)]


def check(folder: Path, machine: dict[str, Version | None]) -> list[str]:
    carried: dict[str, Version] = {}
    problems = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in carried:
            problems.append(f"two wheels of {name}: {carried[name]} and {version}")
        carried[name] = version
    unchecked = set()
    for wheel in sorted(folder.glob("*.whl")):
        owner = parse_wheel_filename(wheel.name)[0]
        for req in requirements(wheel):
            name = canonicalize_name(req.name)
            if name in NOT_AT_RUNTIME:
                continue
            have = carried.get(name, machine.get(name, "missing"))
            if have == "missing":
                problems.append(f"{owner} needs {req}: neither carried nor on the machine")
            elif have is None:
                unchecked.add(name)
            elif (owner, name) in ACCEPTED:
                print(f"device-closure: {owner} asks for {req}; the machine's {name} {have} is used")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                where = "carried" if name in carried else "on the machine"
                problems.append(f"{owner} needs {req}; {name} {have} is {where}")
    print(f"device-closure: {len(carried)} wheels; requirements met"
          f"{' (version not known on the machine: ' + ', '.join(sorted(unchecked)) + ')' if unchecked else ''}"
          if not problems else f"device-closure: {len(problems)} problem(s)")
    return problems


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    machine = machine_packages(Path(__file__).with_name("device-packages.txt"))
    problems = check(folder, machine)
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
