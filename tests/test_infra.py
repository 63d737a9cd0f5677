"""Deployment configs in infra/, prefect.yaml and presets/: everything that can be checked without
the hardware or services they target (no Docker, GPU or cluster here; see infra/README.md)."""

import importlib
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "infra" / "compose" / "docker-compose.yml"


def test_infra_accelerate_configs_parse():
    """The FSDP launch configs in infra/ are valid accelerate configs (they cannot run here: no GPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in (ROOT / "infra" / "accelerate").glob("*.yaml"):
        config = load_config_from_file(str(path))
        assert str(config.distributed_type).endswith("FSDP"), path


def test_compose_publishes_only_the_uis_on_loopback_and_takes_secrets_from_env():
    compose = yaml.safe_load(COMPOSE.read_text())
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert set(published) == {"mlflow", "prefect-server"}, "the database and object store stay internal"
    for ports in published.values():
        assert all(p.startswith("${PUBLISH_HOST:-127.0.0.1}:") for p in ports), ports
    text = COMPOSE.read_text()
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        for value in re.findall(rf"{key}: (.+)", text):
            assert value.strip().startswith("${"), f"{key} must come from the environment, not the file: {value}"


def test_env_files_with_secrets_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=ROOT)
    assert ignored.returncode == 0
    example = (ROOT / "infra" / "compose" / ".env.example").read_text()
    assert "change-me" in example  # placeholders only


def _has_compose() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.service
@pytest.mark.skipif(not _has_compose(), reason="docker compose is not installed here")
def test_docker_compose_config_validates(tmp_path):
    env = tmp_path / ".env"
    shutil.copy(ROOT / "infra" / "compose" / ".env.example", env)
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kubernetes_work_pool_template_declares_every_placeholder():
    """Prefect fills `{{ name }}` placeholders of job_configuration from `variables`; an undeclared
    one would reach the cluster as literal text."""
    template = json.loads((ROOT / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def test_prefect_yaml_deployments_point_at_real_flows():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for deployment in config["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flow = getattr(importlib.import_module(module), func)
        assert hasattr(flow, "deploy"), f"{deployment['entrypoint']} is not a Prefect flow"
        names.add(f"{flow.name}/{deployment['name']}")
    assert {"onpolicy-pipeline/nightly", "onpolicy-sweep/beta-sweep"} <= names


def test_server_scripts_bind_to_loopback_by_default():
    for script in ("mlflow_server.sh", "prefect_server.sh"):
        text = (ROOT / "infra" / "scripts" / script).read_text()
        assert ":-127.0.0.1}" in text, script
        assert "0.0.0.0" not in text, script


@pytest.mark.parametrize("name", ["cpu-default", "gsm8k", "paper"])
def test_presets_apply_to_params_yaml_and_load(tmp_path, name):
    from onpolicy_core.plumbing.presets import apply_preset

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    config = apply_preset(name, params, ROOT / "presets")
    assert "# " in params.read_text(), "comments are kept"
    if name == "cpu-default":
        assert params.read_text() == (ROOT / "params.yaml").read_text(), "params.yaml ships the cpu-default preset"
    if name == "paper":
        assert config.eval.backend == "vllm" and config.eval.samples == 16 and config.model.source.startswith("Qwen/")


def test_unknown_preset_key_is_an_error(tmp_path):
    from onpolicy_core.plumbing.config import ConfigError
    from onpolicy_core.plumbing.presets import apply_preset

    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bad.yaml").write_text("train: {lerning_rate: 1.0e-05}\n")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="lerning_rate"):
        apply_preset("bad", tmp_path / "params.yaml", tmp_path / "presets")


def test_docker_build_context_leaves_out_secrets_stores_and_outputs():
    """infra/compose/Dockerfile copies the checkout: the real .env, the local MLflow store, the
    environment and the pipeline outputs must not end up in the image."""
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".env", "**/.env", ".venv", "artifacts", "mlflow.db", "mlruns", ".git", ".dvc/cache"} <= patterns


def test_the_mlflow_container_installs_nothing_when_it_starts():
    compose = yaml.safe_load(COMPOSE.read_text())
    mlflow = compose["services"]["mlflow"]
    assert "pip install" not in mlflow["command"]
    dockerfile = (ROOT / "infra" / "compose" / mlflow["build"]["dockerfile"]).read_text()
    for line in dockerfile.splitlines():
        if "pip install" in line:
            packages = [w for w in line.split("pip install", 1)[1].split() if not w.startswith("-")]
            assert packages and all("==" in p for p in packages), f"unpinned: {line}"
