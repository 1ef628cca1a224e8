"""The two locks: ``requirements.lock`` runs tokenrelay (quick start), ``requirements-test.lock``
also tests it. The quick start must install nothing that only the tests need."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.stack import ROOT

TEST_ONLY = {"pytest", "pytest-asyncio", "playwright", "schemathesis", "hypothesis", "ruff",
             "mypy", "check-jsonschema"}


def pins(lock: str) -> dict[str, str]:
    """name -> pinned version of every package in a lock file."""
    found: dict[str, str] = {}
    for line in (ROOT / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def runtime_requirements() -> list[Requirement]:
    """What ``pip install '.[embedded]'`` asks for: the dependencies and the embedded extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["embedded"]]
    return [Requirement(r) for r in names]


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution those requirements pull in on this interpreter (from the installed
    metadata), extras included."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # not needed on this platform: the marker check below covers it
        for raw in dist.requires or []:
            sub = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return {key.split("[", 1)[0] for key in seen}


def test_the_run_lock_has_no_test_tools() -> None:
    """requirements.lock (the quick start's) pins none of the tools only the tests need."""
    run_lock = pins("requirements.lock")
    assert run_lock, "requirements.lock has no pins"
    assert not TEST_ONLY & run_lock.keys(), sorted(TEST_ONLY & run_lock.keys())
    test_lock = pins("requirements-test.lock")
    assert TEST_ONLY <= test_lock.keys(), sorted(TEST_ONLY - test_lock.keys())


def test_the_run_lock_has_everything_the_package_needs() -> None:
    """Each dependency of pyproject.toml (and of the embedded extra), and each of theirs,
    is pinned in requirements.lock at a version the requirement allows."""
    run_lock = pins("requirements.lock")
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in run_lock, f"{req} is not in requirements.lock"
        assert req.specifier.contains(run_lock[name], prereleases=True), (
            f"requirements.lock pins {name}=={run_lock[name]}, pyproject asks {req}")
    missing = closure(runtime_requirements()) - run_lock.keys()
    assert not missing, f"needed at run time but not in requirements.lock: {sorted(missing)}"


def test_both_locks_pin_the_same_versions() -> None:
    """The test lock runs the same versions as the run lock (tests test what users run)."""
    run_lock, test_lock = pins("requirements.lock"), pins("requirements-test.lock")
    differ = {n: (v, test_lock.get(n)) for n, v in run_lock.items() if test_lock.get(n) != v}
    assert not differ, differ
