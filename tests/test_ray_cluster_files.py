"""The files in ray_cluster/ are what Ray itself accepts (the live tests are in test_ray_cluster.py)."""

import json
import subprocess
from pathlib import Path

import ray.autoscaler
import yaml
from conftest import ROOT
from jsonschema import validate
from ray.runtime_env import RuntimeEnv

CLUSTER = ROOT / "ray_cluster"


def test_cluster_launcher_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    validate(config, schema)
    assert config["available_node_types"]["gpu-a10g"]["resources"]["GPU"] == 1


def test_runtime_env_is_a_ray_runtime_env_that_leaves_out_local_state():
    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert {".venv", ".git", "runs", "mlruns"} <= set(env["excludes"])


def test_start_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(CLUSTER / "start-local-head.sh")]).returncode == 0
