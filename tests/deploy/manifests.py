"""Reading the deployment files the way their tools do, for cross-checks without a container runtime."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}


def kube_documents() -> list[tuple[str, dict]]:
    """Every Kubernetes object under deploy/kuberay, with the file it came from."""
    docs = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in kube_documents() if doc.get("kind") == kind]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(role, pod spec) of every pod a RayCluster, RayJob or Deployment creates."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]["spec"]
    elif kind == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]
    elif kind == "Deployment":
        yield "deployment", spec["template"]["spec"]


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for role, pod in pod_specs(doc):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            yield role, c


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_dependency(name: str) -> str:
    """The exact version pyproject.toml pins `name` to (`name[extras]==X`)."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no exact version of {name}")


def makefile_torch_version() -> str:
    m = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile defines no TORCH_VERSION"
    return m.group(1)


@dataclass
class Dockerfile:
    """Instructions as (KEYWORD, arguments), continuation lines joined and comments dropped."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> "Dockerfile":
        logical, current = [], ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#") or not line:
                continue  # comments and blank lines, also between continuation lines
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            logical.append(current + line)
            current = ""
        assert not current, f"{path}: the last instruction ends with a line continuation"
        out = cls()
        for line in logical:
            keyword, _, args = line.partition(" ")
            out.instructions.append((keyword.upper(), args.strip()))
        return out

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def labels(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for args in self.args("LABEL"):
            for key, value in re.findall(r'([\w.\-]+)="([^"]*)"', args):
                found[key] = value
        return found

    def pip_requirements(self) -> list[str]:
        """The quoted requirement specs of every `pip install` / `uv pip install`."""
        reqs: list[str] = []
        for run in self.args("RUN"):
            for cmd in re.split(r"&&|;", run):
                if re.search(r"\bpip install\b", cmd):
                    reqs += re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?[^"\s]*)"', cmd)
        return reqs

    def base_images(self) -> list[str]:
        images = [a.split()[0] for a in self.args("FROM")]
        images += [m for a in self.args("COPY") for m in re.findall(r"--from=(\S+)", a)]
        return images


def env_list(container: dict) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}
