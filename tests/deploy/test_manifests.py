"""The deployment files cannot run here (no container daemon, no Kubernetes): check their structure
and that everything they name exists in this repo, under the security defaults pofa promises."""
from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.deploy.manifests import (DEPLOY, DOCKERFILES, ROOT, Dockerfile, by_kind, compose, containers,
                                    env_list, kube_documents, makefile_torch_version, pinned_dependency,
                                    pod_specs, pyproject)

# torch 2.13's default PyPI wheel is its CUDA 13.0 build; DeepSpeed's JIT needs the same nvcc major.minor.
TORCH_PYPI_CUDA = "13.0"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY|CREDENTIAL", re.I)
IMAGE_TAG = re.compile(r"^pofa:(?P<version>[\w.]+)-(?P<flavor>\w+)$")


def _image_labels() -> dict[str, str]:
    """Image tag -> Dockerfile that builds it (each Dockerfile names its tag in the ai.pofa.image label)."""
    tags = {}
    for flavor, path in DOCKERFILES.items():
        tag = Dockerfile.read(path).labels().get("ai.pofa.image")
        assert tag, f"{path.name}: no LABEL ai.pofa.image=\"pofa:VERSION-FLAVOR\""
        tags[tag] = path.name
    return tags


# ---------------------------------------------------------------- Kubernetes structure


def test_every_kubernetes_object_is_well_formed() -> None:
    docs = kube_documents()
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim"} <= set(kinds), kinds
    for name, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{name}: {sorted(doc)}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", f"{name}: {doc['apiVersion']}"
        for role, c in containers(doc):
            assert c.get("name") and c.get("image"), f"{name} {role}: container without name or image"


def test_raycluster_autoscales_and_matches_the_installed_ray() -> None:
    import ray

    [cluster] = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_dependency("ray") == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], "head without containers"
    assert spec["workerGroupSpecs"], "no worker groups"
    for group in spec["workerGroupSpecs"]:
        lo, n, hi = group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]
        assert 0 <= lo <= n <= hi and hi > lo, f"worker group {group['groupName']}: {lo} <= {n} <= {hi}"
        assert isinstance(group["rayStartParams"], dict)
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpu and all("cu" in g["template"]["spec"]["containers"][0]["image"] for g in gpu), \
        "GPU worker groups must use the CUDA image"


def _head_mounts() -> dict[str, dict]:
    """Mount path -> volume on the RayCluster head."""
    [cluster] = by_kind("RayCluster")
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0].get("volumeMounts", [])}


def _volume_at(mounts: dict[str, dict], path: str) -> dict:
    hits = [(mp, vol) for mp, vol in mounts.items() if PurePosixPath(path).is_relative_to(mp)]
    assert hits, f"{path} is on no volume of the head pod (mounts: {sorted(mounts)})"
    return max(hits, key=lambda h: len(h[0]))[1]


def test_rayjob_runs_a_real_pofa_command_on_the_cluster(tmp_path: Path) -> None:
    from orchestrator.cli import _parser
    from orchestrator.recipe.load import load_recipe

    [cluster] = by_kind("RayCluster")
    [job] = by_kind("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "pofa", argv
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{job['spec']['entrypoint']}` is not a valid pofa command line")
    assert args.command == "run"

    # The recipe path is the head's mount of the ConfigMap, and the key exists and validates.
    mounts = _head_mounts()
    recipe_vol = _volume_at(mounts, args.recipe)
    cm_name = recipe_vol["configMap"]["name"]
    [cm] = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == cm_name]
    key = PurePosixPath(args.recipe).name
    assert key in cm["data"], f"ConfigMap {cm_name} has no key {key}"
    recipe_file = tmp_path / key
    recipe_file.write_text(cm["data"][key])
    recipe = load_recipe(str(recipe_file), args.overrides)
    assert recipe.stages and recipe.student is not None
    # Worker groups that scale from zero: training stages must wait for the autoscaler's nodes.
    if any(g.get("minReplicas", 0) == 0 for g in cluster["spec"]["workerGroupSpecs"]):
        assert recipe.ray.resource_wait_s > 0, "an autoscaled cluster needs ray.resource_wait_s"
    assert "@" not in (recipe.tracking.uri or ""), "credentials in the recipe's tracking.uri"

    # The run directory is on the shared PVC, which every Ray pod mounts at the same path.
    [pvc] = by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert args.run_dir, "the RayJob must name a --run-dir on the shared volume"
    run_vol = _volume_at(mounts, args.run_dir)
    assert run_vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for role, pod in pod_specs(cluster):
        claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                  == pvc["metadata"]["name"]}
        paths = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims}
        assert any(PurePosixPath(args.run_dir).is_relative_to(p) for p in paths), f"{role}: no shared runs volume"


# ---------------------------------------------------------------- security defaults


def test_nothing_is_exposed_outside_the_cluster() -> None:
    docs = [doc for _, doc in kube_documents()]
    assert not [d for d in docs if d["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    for svc in [d for d in docs if d["kind"] == "Service"]:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    [cluster] = by_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "ingress" not in head.get("enableIngress", {}) and not head.get("enableIngress")
    for doc in docs:
        for role, pod in pod_specs(doc):
            assert not pod.get("hostNetwork"), f"{doc['kind']} {role}: hostNetwork"
            for c in pod["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", [])), f"{role}: hostPort"
    # The dashboard binds every interface of the pod only because the Service above is ClusterIP and
    # the NetworkPolicy admits this namespace alone.
    if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":
        [policy] = by_kind("NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_every_ray_process_requires_the_token_from_a_secret() -> None:
    [cluster] = by_kind("RayCluster")
    [job] = by_kind("RayJob")
    envs = [(role, env_list(c)) for doc in (cluster, job) for role, c in containers(doc)]
    envs.append(("autoscaler", {e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]}))
    for role, env in envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token", role
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pofa-ray-auth", "key": "auth_token"}, role


def test_no_credentials_inline_in_kubernetes() -> None:
    for name, doc in kube_documents():
        assert doc["kind"] != "Secret", f"{name}: Secrets are created by the operator, not committed"
        for role, c in containers(doc):
            for var, entry in env_list(c).items():
                value = str(entry.get("value", ""))
                if SECRET_NAME.search(var) or re.search(r"://[^/@\s]+:[^/@\s]+@", value):
                    assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                        f"{name} {role}: {var} must come from a Secret (secretKeyRef)"


def test_no_credentials_inline_in_compose() -> None:
    env_example = (DEPLOY / "docker" / "compose.env.example").read_text()
    for service, spec in compose()["services"].items():
        env = spec.get("environment", {})
        assert isinstance(env, dict), f"{service}: use the mapping form of environment"
        for var, value in env.items():
            value = str(value)
            for m in re.finditer(r"\$\{(\w+)(:?[-?+])?", value):
                assert m.group(2) == ":?", f"{service}: {var} uses ${{{m.group(1)}}} without ':?' (no defaults)"
                assert re.search(rf"^{m.group(1)}=", env_example, re.M), f"{m.group(1)} not in compose.env.example"
            if SECRET_NAME.search(var) and var != "RAY_AUTH_MODE":
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{service}: {var} is inline; use ${{VAR:?...}}"
            for cred in re.findall(r"://[^/@\s]+:([^@\s]+)@", value):
                assert cred.startswith("${"), f"{service}: {var} has a password inline"


def test_compose_publishes_on_loopback_only() -> None:
    for service, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{service}: port {port} is reachable from other hosts"
        assert spec.get("network_mode") != "host", service


# ---------------------------------------------------------------- compose


def test_compose_brings_up_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "ray-head", "ray-worker"} <= services.keys()
    workers = [s for name, s in services.items() if name.startswith("ray-worker")]
    assert sum(s.get("deploy", {}).get("replicas", 1) for s in workers) == 2
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"]
    port = next(a.split("=")[1] for a in head if a.startswith("--port="))
    for w in workers:
        assert f"--address=ray-head:{port}" in w["command"]
        assert w["environment"]["RAY_AUTH_TOKEN"] == services["ray-head"]["environment"]["RAY_AUTH_TOKEN"]
    assert services["mlflow"]["environment"]["POFA_MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["POFA_MLFLOW_ARTIFACTS"].startswith("s3://")
    for image in (services["postgres"]["image"], services["minio"]["image"]):
        assert ":" in image and not image.endswith(":latest"), image


def _start_sh_required() -> set[str]:
    text = (DEPLOY / "mlflow" / "start.sh").read_text()
    return set(re.findall(r'\[\[ -n "\$\{(\w+):-\}" \]\] *\\?\s*\|\| die', text))


def test_mlflow_services_run_the_start_script_with_what_it_requires() -> None:
    required = _start_sh_required()
    assert {"POFA_MLFLOW_BACKEND_STORE_URI", "POFA_MLFLOW_ARTIFACTS", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= required
    mlflow_svc = compose()["services"]["mlflow"]
    [deployment] = [d for d in by_kind("Deployment") if "mlflow" in d["metadata"]["name"]]
    [(_, k8s)] = list(containers(deployment))
    for name, command, env in (("compose", mlflow_svc["command"], mlflow_svc["environment"]),
                               ("kuberay", k8s["command"], env_list(k8s))):
        script = next(a for a in command if a.endswith("start.sh"))
        assert script == "/opt/pofa/deploy/mlflow/start.sh", f"{name}: {script}"
        assert not required - set(env), f"{name}: start.sh needs {sorted(required - set(env))}"
    # The image copies the script to where they run it.
    assert "deploy/mlflow ./deploy/mlflow" in Dockerfile.read(DOCKERFILES["cpu"]).args("COPY")
    assert (ROOT / "deploy" / "mlflow" / "start.sh").is_file()


# ---------------------------------------------------------------- images


def test_manifests_name_only_the_images_the_dockerfiles_build() -> None:
    built = _image_labels()
    version = pyproject()["project"]["version"]
    for tag in built:
        m = IMAGE_TAG.match(tag)
        assert m and m.group("version") == version, f"{tag}: expected pofa:{version}-FLAVOR"
    used = set()
    for name, doc in kube_documents():
        for role, c in containers(doc):
            if c["image"].startswith("pofa"):
                assert c["image"] in built, f"{name} {role}: {c['image']} is built by no Dockerfile ({sorted(built)})"
                used.add(c["image"])
    for service, spec in compose()["services"].items():
        image = spec.get("image", "")
        if "build" in spec:
            dockerfile = ROOT / "deploy" / spec["build"]["context"] / spec["build"]["dockerfile"]
            assert dockerfile.resolve().is_file(), f"{service}: {dockerfile}"
            assert built.get(image) == dockerfile.name, f"{service}: {image} is not what {dockerfile.name} builds"
        if image.startswith("pofa"):
            assert image in built, f"compose {service}: {image}"
            used.add(image)
    assert used == set(built), f"images built but never used: {set(built) - used}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_pins_everything(flavor: str) -> None:
    path = DOCKERFILES[flavor]
    df = Dockerfile.read(path)
    for image in df.base_images():
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest", f"{path.name}: {image} is not pinned to a tag"
    reqs = df.pip_requirements()
    for req in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[\w,\-]+\])?==[\w.]+", req), f"{path.name}: {req} is not pinned"
    pins = {re.split(r"[\[=]", r)[0].lower(): r.split("==")[1] for r in reqs}
    assert pins["torch"] == makefile_torch_version(), f"{path.name}: torch {pins['torch']}"
    assert pins["mlflow"] == pinned_dependency("mlflow")
    # The repo itself is installed with torch held at that pin, so pip cannot swap the build.
    assert any(re.search(r"pip install -c \S+ \.$", r.split("&&")[1].strip()) for r in df.args("RUN")
               if "torch==" in r and "&&" in r), f"{path.name}: install pofa under the torch constraint"
    for src in [a.split()[0] for a in df.args("COPY") if not a.startswith("--from")]:
        assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist in the repo"
    assert any("g++" in r for r in df.args("RUN")), f"{path.name}: DeepSpeed's JIT ops need g++"
    assert df.args("USER") and df.args("USER")[-1] not in ("root", "0"), f"{path.name}: runs as root"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_builds_deepspeeds_ops_for_the_user_that_loads_them(flavor: str) -> None:
    """No container compiles an op at its first training step: the image builds them once, after pofa is
    installed, as its runtime user, into a folder outside $HOME that this user owns (workers/native_ops.py)."""
    from workers.native_ops import CACHE_ENV

    path = DOCKERFILES[flavor]
    steps = Dockerfile.read(path).instructions
    build = [i for i, step in enumerate(steps) if step == ("RUN", "pofa doctor --build-ops")]
    assert len(build) == 1, f"{path.name}: build DeepSpeed's ops once with `RUN pofa doctor --build-ops`"
    before, after = steps[:build[0]], steps[build[0] + 1:]
    assert any(k == "RUN" and re.search(r"pip install -c \S+ \.", a) for k, a in before), \
        f"{path.name}: the ops are built before pofa is installed"
    users = [a for k, a in steps if k == "USER"]
    assert [a for k, a in before if k == "USER"][-1:] == users[-1:], f"{path.name}: built by another user than runs"
    folders = [m for k, a in before if k == "ENV" for m in re.findall(rf"\b{CACHE_ENV}=(\S+)", a)]
    assert folders and PurePosixPath(folders[-1]).is_absolute() and not folders[-1].startswith("/home"), \
        f"{path.name}: set {CACHE_ENV} to a folder outside $HOME before building the ops"
    chowns = [cmd.split() for k, a in before if k == "RUN" for cmd in re.split(r"&&|;", a)]
    assert any(c[:2] == ["chown", f"{users[-1]}:{users[-1]}"] and folders[-1] in c for c in chowns), \
        f"{path.name}: {folders[-1]} must belong to {users[-1]}, who loads (and may rebuild) the ops"
    # what names the ops' folder must not change between the build and the containers that load them
    assert not [a for k, a in after if k == "ENV" and re.search(rf"\b({CACHE_ENV}|CXX|PATH)=", a)], path.name


def test_both_images_use_the_same_python_and_the_cuda_of_torchs_wheel() -> None:
    cpu, cuda = (Dockerfile.read(DOCKERFILES[f]) for f in ("cpu", "cuda"))
    cpu_python = re.match(r"python:(\d+\.\d+\.\d+)-", cpu.base_images()[0])
    assert cpu_python, cpu.base_images()[0]
    cuda_python = set(re.findall(r"uv python install (\S+)", " ".join(cuda.args("RUN"))))
    # Ray requires one Python version on every node of a cluster.
    assert cuda_python == {cpu_python.group(1)} and cpu_python.group(1).startswith("3.11.")
    base = cuda.base_images()[0]
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(?:cudnn-)?devel-ubuntu[\d.]+", base)
    assert m, f"{base}: the CUDA image needs a pinned nvidia/cuda *-devel tag (nvcc for DeepSpeed)"
    assert m.group(1) == TORCH_PYPI_CUDA, f"CUDA {m.group(1)} in the image, torch's wheel uses {TORCH_PYPI_CUDA}"
    assert f"pofa:{pyproject()['project']['version']}-cu{TORCH_PYPI_CUDA.replace('.', '')}" in _image_labels()


def test_all_ray_nodes_share_one_environment() -> None:
    """Head and workers of one cluster get the same token and tracking credentials."""
    [cluster] = by_kind("RayCluster")
    envs = {role: env_list(c) for role, c in containers(cluster)}
    head = envs.pop("head")
    assert envs, "no worker groups"
    for role, env in envs.items():
        assert env == head, f"{role}: environment differs from the head's"
    services = compose()["services"]
    assert services["ray-worker"]["environment"] == services["ray-head"]["environment"]


# ---------------------------------------------------------------- preemption and unattended recovery


def test_every_ray_pod_gives_pofa_time_to_checkpoint_on_eviction() -> None:
    from orchestrator.recipe.schema import RayConfig

    grace = RayConfig().preemption_grace_s
    [cluster] = by_kind("RayCluster")
    for role, pod in pod_specs(cluster):
        period = pod["terminationGracePeriodSeconds"]
        assert period >= grace + 5, f"{role}: terminationGracePeriodSeconds {period} < {grace} + 5"
        container = pod["containers"][0]
        assert float(env_list(container)["POFA_TERMINATION_GRACE_S"]["value"]) == period, role
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["pofa", "preempt-node"] and float(hook[hook.index("--wait") + 1]) < period, role
        assert ("--whole-cluster" in hook) == (role == "head"), role
    for name in ("ray-head", "ray-worker"):
        service = compose()["services"][name]
        assert service["stop_grace_period"] == f"{int(float(service['environment']['POFA_TERMINATION_GRACE_S']))}s"


def test_the_rayjob_runs_for_days_and_is_resubmitted() -> None:
    [job] = by_kind("RayJob")
    assert "activeDeadlineSeconds" not in job["spec"]
    assert job["spec"]["backoffLimit"] >= 3
