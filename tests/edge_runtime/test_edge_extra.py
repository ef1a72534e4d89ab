"""`pip install fedhft[edge]` pulls no torch, executorch, transformers or optimum (the edge installs torch-free):
the extra's own list, and everything it pulls as installed here (importlib.metadata requirements, recursively,
markers evaluated for this machine, optional extras of dependencies left out)."""

from __future__ import annotations

import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "executorch", "transformers", "optimum"}


def edge_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["edge"]]]


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


def closure(reqs: list[Requirement]) -> tuple[set[str], set[str]]:
    """(every distribution the requirements pull here, those of them not installed)."""
    seen: set[str] = set()
    missing: set[str] = set()
    todo = [r for r in reqs if _applies(r)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        todo += [r for r in map(Requirement, requires) if _applies(r)]
    return seen, missing


def test_the_edge_extra_names_no_heavy_package() -> None:
    names = {canonicalize_name(r.name) for r in edge_requirements()}
    assert "paho-mqtt" in names and "tokenizers" in names  # the list read is the edge's
    assert not names & HEAVY, names & HEAVY


def test_nothing_the_edge_extra_pulls_is_heavy() -> None:
    pulled, missing = closure(edge_requirements())
    assert not missing, f"not installed here, so their requirements cannot be checked: {sorted(missing)}"
    assert {"numpy", "onnxruntime-training-cpu", "cryptography", "cffi"} <= pulled  # the closure is followed
    assert not pulled & HEAVY, f"the edge extra pulls {sorted(pulled & HEAVY)}"


def test_a_heavy_package_pulled_indirectly_would_be_found() -> None:
    # optimum (installed here for export) pulls torch and transformers; its extras-only requirements are not followed
    pulled, _ = closure([Requirement("optimum")])
    assert {"torch", "transformers"} <= pulled
    assert "torchvision" not in pulled and "optimum-intel" not in pulled
