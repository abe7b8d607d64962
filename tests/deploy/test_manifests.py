"""deploy/ checked without a cluster: schemas, and consistency with the server it deploys."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import kubernetes_validate
import numpy as np
import promql_parser
import pytest
import tritonclient.grpc as triton_grpc
import typer.main
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from helpers import ServerProcess, free_port, running, triton_infer
from resserve.serve.app import build_app
from resserve.serve.metrics import Metrics, ServerProcessCollector
from resserve.serve.settings import (DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, DEFAULT_PORT, LogFormat, ServerSettings,
                                     auto_workers, worker_peak_memory)
from resserve.serve.state import INFERENCE_APIS
from resserve.serve.workers.supervisor import SupervisorMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.31"  # pinned schema version (>= 1.27)
OVERLAYS = ["cpu", "gpu"]


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` (kustomize ships inside kubectl) of an overlay."""
    return kustomize(DEPLOY / "k8s" / "overlays" / overlay)


def kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(result.stdout))


def base_documents() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text())]


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in binary units ("2Gi", "512Mi") as bytes."""
    return int(text[:-2]) * {"Mi": 2**20, "Gi": 2**30}[text[-2:]]


def by_kind(documents: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name or ''}: {len(matches)} found"
    return matches[0]


def serve_options() -> tuple[set[str], set[str]]:
    """The flags and environment variables `resserve serve` accepts."""
    command = typer.main.get_command(build_app()).commands["serve"]
    flags = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}
    envvars = {param.envvar for param in command.params if param.envvar}
    return flags, envvars


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_manifests_validate_against_the_kubernetes_schemas(source):
    documents = base_documents() if source == "base" else render(source)
    assert {d["kind"] for d in documents} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                              "PodDisruptionBudget"}
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_validator_catches_a_misspelled_field():
    deployment = by_kind(base_documents(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_settings_match_the_server(overlay):
    documents = render(overlay)
    deployment = by_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": DEFAULT_HTTP_PORT, "grpc": DEFAULT_PORT, "metrics": DEFAULT_METRICS_PORT}
    # over HTTP, whose health endpoints no gRPC load can starve (tests/serve/test_adversarial.py)
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert ports[container[probe]["httpGet"]["port"]] == DEFAULT_HTTP_PORT
        assert container[probe]["httpGet"]["path"] == path
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULT_METRICS_PORT)

    flags, envvars = serve_options()
    config = by_kind(documents, "ConfigMap", "resserve-config")["data"]
    assert set(config) <= envvars, set(config) - envvars
    assert {e["name"] for e in container["env"]} <= envvars
    assert {a for a in container.get("args", []) if a.startswith("--")} <= flags
    assert config["RESSERVE_PORT"] == str(DEFAULT_PORT) and config["RESSERVE_HTTP_PORT"] == str(DEFAULT_HTTP_PORT)
    assert LogFormat(config["RESSERVE_LOG_FORMAT"]) is LogFormat.JSON  # what a cluster's log collector indexes

    # the pod outlives preStop + drain + grace, so SIGTERM's drain always completes
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    budget = pre_stop + float(config["RESSERVE_DRAIN_SECONDS"]) + float(config["RESSERVE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > budget

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert container["env"][0]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    # the memory limit holds the workers --workers auto runs for the CPU limit, at their worst
    limits, budget = container["resources"]["limits"], int(config.get("RESSERVE_MAX_INFLIGHT_BYTES",
                                                                            ServerSettings.max_inflight_bytes))
    each, memory = worker_peak_memory(budget, http=True), quantity(limits["memory"])
    cpus, device = int(limits["cpu"]), "cuda" if overlay == "gpu" else "cpu"
    workers = auto_workers(cpus, device)
    assert auto_workers(cpus, device, memory // each) == workers
    assert workers * each <= memory
    # a Service named resserve would inject RESSERVE_PORT=tcp://...: service links are off
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_and_labels_line_up(overlay):
    documents = render(overlay)
    deployment = by_kind(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for service in (d for d in documents if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c" and grpc_port["targetPort"] == "grpc"
    http_port = next(p for p in by_kind(documents, "Service", "resserve")["spec"]["ports"] if p["name"] == "http")
    assert (http_port["port"], http_port["targetPort"]) == (DEFAULT_HTTP_PORT, "http")
    assert by_kind(documents, "Service", "resserve-headless")["spec"]["clusterIP"] == "None"
    target = by_kind(documents, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert by_kind(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    env_from = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    assert env_from == by_kind(documents, "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_autoscaler_on_cpu_sees_traffic_not_spinning_threads(overlay):
    """Spinning inference threads keep a pod's CPU high at any traffic, and a CPU-based HPA would
    scale out an idle service: where the HPA reads CPU, the threads sleep between batches."""
    documents = render(overlay)
    metrics = by_kind(documents, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    assert by_kind(documents, "ConfigMap", "resserve-config")["data"]["RESSERVE_THREAD_SPINNING"] == "false"


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image_says_cuda_once():
    container = by_kind(render("gpu"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":cuda")
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", (DEPLOY / "Dockerfile.cuda").read_text(), re.M).group(1))
    assert entrypoint[-2:] == ["--device", "cuda"] and "--device" not in container.get("args", [])  # said once, by the image
    # the CPU limit feeds --workers auto (RESSERVE_CPUS): four processes share the GPU, as measured best on an H200
    assert auto_workers(int(container["resources"]["limits"]["cpu"])) == 4


def test_kserve_inference_service_uses_standard_mode_and_one_http_port():
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    container = service["spec"]["predictor"]["containers"][0]
    # KServe's CRD takes Kubernetes' own container: checked against its schema, as a pod's
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    security = container["securityContext"]
    assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http1", DEFAULT_HTTP_PORT)]
    flags, _ = serve_options()
    assert {a for a in container["args"] if a.startswith("--")} <= flags
    assert container["args"][container["args"].index("--http-port") + 1] == str(DEFAULT_HTTP_PORT)
    assert "--no-thread-spinning" in container["args"]  # KServe's Standard mode scales on CPU by default
    assert LogFormat(container["args"][container["args"].index("--log-format") + 1]) is LogFormat.JSON
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": DEFAULT_HTTP_PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": DEFAULT_HTTP_PORT}
    annotations = service["metadata"]["annotations"]  # KServe's scrape annotations name the metrics port
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == container["args"][container["args"].index("--metrics-port") + 1]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    # one worker per 4 CPUs of the limit, not of the node; the Deployment's memory for its in-flight budgets
    cpus = {e["name"]: e["valueFrom"]["resourceFieldRef"] for e in container["env"]}["RESSERVE_CPUS"]
    assert (cpus["containerName"], cpus["resource"]) == (container["name"], "limits.cpu")
    deployment = by_kind(base_documents(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == deployment["resources"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_run_resserve_serve_as_non_root_with_known_flags(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entrypoint[:2] == ["resserve", "serve"]
    flags, _ = serve_options()
    assert {a for a in entrypoint if a.startswith("--")} <= flags
    assert re.search(r"^USER 10001$", text, re.M)
    assert f"EXPOSE {DEFAULT_HTTP_PORT} {DEFAULT_PORT} {DEFAULT_METRICS_PORT}" in text
    assert "install-serving.sh" in text  # the same install step as the smoke test


# deploy/k8s/monitoring: the Prometheus Operator's PodMonitor and alerts ------------------------

MONITORING = DEPLOY / "k8s" / "monitoring"
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def exported_samples() -> dict[str, set[str]]:
    """Each sample name a server exports (its workers' metrics and the supervisor's) -> its labels."""
    collectors = [*vars(Metrics()).values(), *vars(SupervisorMetrics(CollectorRegistry())).values()]
    samples = {}
    for collector in (c for c in collectors if isinstance(c, MetricWrapperBase)):
        labels = set(collector._labelnames)  # prometheus-client has no public accessor for them
        for family in collector.describe():
            for suffix in SAMPLE_SUFFIXES[family.type]:
                samples[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in ServerProcessCollector().collect():  # the server's CPU and memory: collected, not declared
        samples |= {sample.name: set(sample.labels) for sample in family.samples}
    return samples


def alert_rules() -> list[dict]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """The series an expression reads (it must parse as PromQL)."""
    found = []
    promql_parser.walk(promql_parser.parse(expr),
                       lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None)
    return found


def test_each_alert_reads_metrics_and_labels_the_server_exports():
    samples, rules = exported_samples(), alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules) > 0
    for rule in rules:
        read = selectors(rule["expr"])
        assert read, rule["alert"]
        for selector in read:
            assert selector.name in samples, (rule["alert"], selector.name)
            assert {m.name for m in selector.matchers.matchers} <= samples[selector.name], rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_check_catches_a_metric_the_server_does_not_export():
    assert "resserve_request_total" not in exported_samples()  # a counter without its _total
    assert [s.name for s in selectors('rate(resserve_request_total{api="kserve"}[5m])')] == ["resserve_request_total"]
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(resserve_requests_total[5m])")


def test_alerts_on_inference_read_exactly_the_inference_apis():
    """An alert on inference failures or latency would otherwise count metadata, statistics and
    model loads, or miss an inference API."""
    for rule in alert_rules():
        for selector in selectors(rule["expr"]):
            for matcher in (m for m in selector.matchers.matchers if m.name == "api"):
                assert set(matcher.value.split("|")) == INFERENCE_APIS, rule["alert"]


PROMTOOL_CASES = Path(__file__).with_name("alerts.promtool.yaml")


def prometheus_tool(name: str) -> str:
    """The path of ``name`` from Debian's prometheus: skipped where it is not installed, but for CI
    (.ci/run installs it)."""
    tool = shutil.which(name)
    if tool is None and not os.environ.get("CI"):
        pytest.skip(f"{name} (Debian's prometheus) is not installed; .ci/run installs it")
    assert tool, f"{name} (Debian's prometheus) is missing in CI"
    return tool


def promtool(*args: str, cwd: Path) -> str:
    """Prometheus's own rule checker; the failure's output, or ""."""
    result = subprocess.run([prometheus_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_the_alerts_fire_when_they_should_and_only_then(tmp_path):
    """promtool checks the rules, their templates included, and runs the cases of
    tests/deploy/alerts.promtool.yaml on them: every alert fires on what it is about, with the
    labels that say where, and not on what it is not (metadata failures, clients' mistakes,
    model loads' latency, a worker back within minutes, reloads that succeeded)."""
    groups = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "checked.yaml").write_text(yaml.safe_dump(groups))
    assert promtool("check", "rules", "checked.yaml", cwd=tmp_path) == ""
    for rule in (r for group in groups["groups"] for r in group["rules"]):
        del rule["annotations"]  # the cases are about when an alert fires, not its words
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(PROMTOOL_CASES, tmp_path)
    assert promtool("test", "rules", PROMTOOL_CASES.name, cwd=tmp_path) == ""
    cases = yaml.safe_load(PROMTOOL_CASES.read_text())["tests"]
    tested = {case["alertname"] for test in cases for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {r["alert"] for r in alert_rules()}  # every alert is seen to fire


def test_the_pod_monitor_scrapes_the_metrics_port_of_the_deployments_pods():
    documents = kustomize(MONITORING)
    assert {d["kind"] for d in documents} == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    monitor = by_kind(documents, "PodMonitor")
    template = by_kind(base_documents(), "Deployment")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (ports[endpoint["port"]], endpoint["path"]) == (DEFAULT_METRICS_PORT, "/metrics")


# deploy/k8s/monitoring/dashboard.json: the Grafana dashboard ------------------------------------

DASHBOARD = MONITORING / "dashboard.json"
SCRAPE_LABELS = {"namespace", "pod"}  # what Prometheus adds to each series it scrapes from a pod


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(namespace: str = "default", pods: str = ".*", rate_interval: str = "1m") -> dict[str, str]:
    """Each query of the dashboard (its panel's title and the query's legend -> PromQL), with the
    variables filled in as Grafana does (``pods``: the regex of "All")."""
    queries = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            queries[f"{panel['title']}: {target['legendFormat']}"] = expr.replace("$namespace", namespace).replace(
                "$pod", pods)
    return queries


def test_each_dashboard_query_reads_metrics_and_labels_the_server_exports():
    samples = exported_samples()
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len({p["title"] for p in panels}) == len(panels) > 0
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["description"] and panel["targets"]
    for name, expr in dashboard_queries().items():
        read = selectors(expr)
        assert read, name
        for selector in read:
            assert selector.name in samples, (name, selector.name)
            assert {m.name for m in selector.matchers.matchers} <= samples[selector.name] | SCRAPE_LABELS, name
            for matcher in (m for m in selector.matchers.matchers if m.name == "api"):
                assert set(matcher.value.split("|")) == INFERENCE_APIS, name
    for variable in (v for v in dashboard()["templating"]["list"] if v["type"] == "query"):
        (metric,) = re.findall(r"label_values\((\w+)", variable["definition"])
        assert metric in samples, variable["name"]


def test_dashboard_panels_do_not_overlap():
    taken = set()
    for panel in dashboard()["panels"]:
        box = panel["gridPos"]
        cells = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert box["x"] + box["w"] <= 24 and not cells & taken, panel["title"]
        taken |= cells


def test_the_dashboard_shows_a_real_server_as_prometheus_scrapes_it(tmp_path):
    """Prometheus itself (Debian's, the package promtool comes in) scrapes a server with two
    workers under load, and every query of the dashboard answers with numbers."""
    prometheus = prometheus_tool("prometheus")
    with ServerProcess("--workers", "2") as server:
        pod = {"targets": [f"127.0.0.1:{server.metrics_port}"], "labels": {"namespace": "default", "pod": "resserve-0"}}
        config = {"global": {"scrape_interval": "1s"},
                  "scrape_configs": [{"job_name": "resserve", "static_configs": [pod]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()

        def load(stop: threading.Event) -> None:
            client = triton_grpc.InferenceServerClient(server.target)
            while not stop.is_set():
                triton_infer(client, np.zeros((1, 1, 28, 28), np.float32))

        with (tmp_path / "prometheus.log").open("w") as log:
            scraper = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                        f"--storage.tsdb.path={tmp_path / 'data'}",
                                        f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        try:
            with running(load):
                empty = answer_each(f"http://127.0.0.1:{port}", dashboard_queries(rate_interval="5s"), seconds=60)
        finally:
            scraper.terminate()
            scraper.wait(10)
    assert not empty, f"no numbers from: {empty}\n" + (tmp_path / "prometheus.log").read_text()[-2000:]


def answer_each(prometheus: str, queries: dict[str, str], seconds: float) -> list[str]:
    """Asks ``prometheus`` each query until every one answers with a number (not NaN, as a quantile
    of no requests is), or ``seconds`` pass; the names of those that did not."""
    deadline, waiting = time.monotonic() + seconds, dict(queries)
    while waiting and time.monotonic() < deadline:
        for name, expr in list(waiting.items()):
            try:
                with urllib.request.urlopen(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                            timeout=5) as response:
                    results = json.load(response)["data"]["result"]
            except OSError:  # Prometheus is still starting
                continue
            if results and all(result["value"][1] != "NaN" for result in results):
                del waiting[name]
        time.sleep(0.5)
    return list(waiting)
