"""`mesh render k8s`: the manifests, checked against the Kubernetes OpenAPI schema and read as a cluster would.

Every core object is validated with kubernetes-validate (strict: no unknown
field) against Kubernetes 1.29, the first release with native sidecar
containers on by default, and against the newest schema the package ships.
cert-manager's Issuer and Certificate are custom resources, not in that
schema: they are checked against the fields of cert-manager's v1 CRDs here.
Nothing here talks to a cluster.
"""

from __future__ import annotations

import base64
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh import config as config_mod
from mesh.cli import main
from mesh.config import MeshConfig
from mesh.control import kubernetes
from mesh.control.docker.images import base_tag
from mesh.control.docker.layout import MESH_PORT, PUBLIC_PORT
from mesh.sidecar.identity import Identity, describe

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SIDECAR_PORTS = {MESH_PORT, PUBLIC_PORT}

# Kubernetes' own rules for names, label keys and values (k8s.io/apimachinery validation).
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

# cert-manager.io/v1, from its CRDs (deploy/crds/cert-manager.io_certificates.yaml, _issuers.yaml).
CERTIFICATE_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses", "encodeUsagesInRequest",
    "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject", "nameConstraints", "otherNames",
    "privateKey", "renewBefore", "renewBeforePercentage", "revisionHistoryLimit", "secretName",
    "secretTemplate", "signatureAlgorithm", "subject", "uris", "usages",
}
USAGES = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
          "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
          "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
ISSUER_KINDS = {"acme", "ca", "selfSigned", "vault", "venafi"}

MESH = '''
[mesh]
name = "shop"
plugin_path = ["plugins"]

[services.web]
build = "web"
port = 8000
expose = 8080
health = "/healthz"
plugins = [{ use = "stamp.py:Stamp" }]
cpus = 0.5
memory = "128m"

[services.orders]
image = "registry.example/orders:1.2"
port = 9000
replicas = 3
env = { LOG_LEVEL = "info" }

[services.convert]
build = "convert"
scale = { min = 1, max = 4, cpu = 0.6, cooldown = "45s" }

[services.report]
build = "report"
job = true

[[routes]]
from = "web"
to = "orders"

[[routes]]
from = "web"
to = "convert"

[[routes]]
from = "report"
to = "orders"
'''

STAMP = '''
from mesh import Plugin


class Stamp(Plugin):
    async def handle(self, request, call_next):
        return await call_next(request)
'''


def write_mesh(folder: Path, text: str = MESH, *, plugin: str = STAMP) -> MeshConfig:
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    (folder / "plugins" / "stamp.py").write_text(plugin)
    (folder / "mesh.toml").write_text(text)
    return config_mod.load(folder / "mesh.toml")


@pytest.fixture
def shop(tmp_path: Path) -> MeshConfig:
    """A mesh with an exposed service, a replicated one, a pool and a job (`report`)."""
    return write_mesh(tmp_path)


def by_kind(manifests: kubernetes.Manifests) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in manifests.documents}


def validate(doc: dict[str, Any]) -> None:
    """The schema for core objects; cert-manager's CRD fields for its own."""
    if doc["apiVersion"] == "cert-manager.io/v1":
        check_cert_manager(doc)
    else:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    check_names(doc)


def check_cert_manager(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        assert len(spec) == 1 and set(spec) <= ISSUER_KINDS, spec
        return
    assert doc["kind"] == "Certificate"
    assert set(spec) <= CERTIFICATE_FIELDS, set(spec) - CERTIFICATE_FIELDS
    assert {"issuerRef", "secretName"} <= set(spec)
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
    assert set(spec.get("usages", [])) <= USAGES
    assert re.fullmatch(r"\d+h", spec["duration"])
    key = spec["privateKey"]
    assert key["algorithm"] in {"RSA", "ECDSA", "Ed25519"} and key.get("rotationPolicy", "Always") in {"Always",
                                                                                                      "Never"}


def check_names(doc: dict[str, Any]) -> None:
    """Names are DNS subdomains; label keys and values, everywhere in the object, are valid."""
    name = doc["metadata"]["name"]
    assert len(name) <= 253 and _SUBDOMAIN.match(name), name
    if doc["kind"] == "Service":
        assert len(name) <= 63 and "." not in name, name
    for labels in label_maps(doc):
        for key, value in labels.items():
            prefix, _, label = key.rpartition("/")
            assert not prefix or (len(prefix) <= 253 and _SUBDOMAIN.match(prefix)), key
            assert len(label) <= 63 and _LABEL_NAME.match(label), key
            assert value == "" or (len(value) <= 63 and _LABEL_NAME.match(value)), value


def label_maps(value: Any) -> list[dict[str, str]]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("labels", "matchLabels", "selector") and isinstance(item, dict) and \
                    all(isinstance(v, str) for v in item.values()):
                found.append(item)
            else:
                found += label_maps(item)
    elif isinstance(value, list):
        for item in value:
            found += label_maps(item)
    return found


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


# --- the examples ----------------------------------------------------------------------------------

def example_paths() -> list[str]:
    return ["mesh.toml", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*/mesh.toml"))]


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """The repository's meshes, copied (rendering makes a mesh CA in the state folder)."""
    ignore = shutil.ignore_patterns(".mesh", "__pycache__", ".sandbox-data")
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=ignore)
    shutil.copy(ROOT / "mesh.toml", tmp_path / "mesh.toml")
    return tmp_path


@pytest.mark.parametrize("cert_manager", [False, True], ids=["secrets", "cert-manager"])
@pytest.mark.parametrize("path", example_paths())
def test_every_example_renders_to_valid_manifests(examples: Path, path: str, cert_manager: bool) -> None:
    config = config_mod.load(examples / path)
    manifests = kubernetes.render(config, cert_manager=cert_manager)
    for doc in manifests.documents:
        validate(doc)
    found = by_kind(manifests)
    config_map = found[("ConfigMap", config.name)]
    assert config.path.name in config_map["data"]
    for name, service in config.services.items():
        if service.instances is not None:
            assert not any(doc["metadata"]["labels"].get("mesh.service") == name for doc in manifests.documents)
            assert any(note.startswith(f"services.{name}: not rendered") for note in manifests.notes)
            continue
        deployment = found[("Deployment", f"{config.name}-{name}")]
        assert found[("Service", f"{config.name}-{name}")]["spec"]["clusterIP"] == "None"
        assert ("NetworkPolicy", f"{config.name}-{name}") in found
        kind = "Certificate" if cert_manager else "Secret"
        assert (kind, f"{config.name}-{name}" + ("" if cert_manager else "-tls")) in found
        assert pod_of(deployment)["initContainers"][0]["restartPolicy"] == "Always"


def test_the_gateway_example_carries_the_jwks_but_not_the_signing_key(examples: Path) -> None:
    config = config_mod.load(examples / "examples/gateway/mesh.toml")
    manifests = kubernetes.render(config)
    config_map = by_kind(manifests)[("ConfigMap", "gateway")]
    pod = pod_of(by_kind(manifests)[("Deployment", "gateway-gateway")])
    paths = {item["path"] for item in pod["volumes"][0]["configMap"]["items"]}
    assert paths == {"mesh.toml", "keys/jwks.json"}
    assert not any("PRIVATE KEY" in value for value in config_map["data"].values())


# --- the pod ---------------------------------------------------------------------------------------

def test_the_sidecar_is_a_native_sidecar_holding_the_only_mounts(shop: MeshConfig) -> None:
    manifests = kubernetes.render(shop, image_prefix="registry.example/team")
    found = by_kind(manifests)
    pod = pod_of(found[("Deployment", "shop-web")])
    [sidecar] = pod["initContainers"]
    [app] = pod["containers"]
    assert sidecar["restartPolicy"] == "Always" and "restartPolicy" not in app
    assert sidecar["image"] == f"registry.example/team/{base_tag()}"
    assert app["image"] == "registry.example/team/mesh-shop-web:latest"
    assert pod_of(found[("Deployment", "shop-orders")])["containers"][0]["image"] == "registry.example/orders:1.2"
    command = sidecar["command"]
    assert command[:2] == ["mesh", "sidecar"]
    option = dict(zip(command[2::2], command[3::2], strict=False))
    assert option["--service"] == "web" and option["--app-port"] == "8000"
    assert option["--config"] == "/mesh/config/mesh.toml" and option["--tls"] == "/mesh/tls"
    assert option["--registry"] == "/mesh/registry/registry.json"
    assert option["--public-port"] == str(PUBLIC_PORT) and option["--public-host"] == "0.0.0.0"
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} == {"/mesh/config", "/mesh/registry", "/mesh/tls"}
    assert all(m["readOnly"] for m in sidecar["volumeMounts"])
    assert "volumeMounts" not in app  # SECURITY: the app sees neither the key nor the sidecar's files
    assert "startupProbe" in sidecar and "readinessProbe" in sidecar
    assert "/healthz" in " ".join(sidecar["readinessProbe"]["exec"]["command"])
    assert pod["automountServiceAccountToken"] is False
    tls = next(v for v in pod["volumes"] if v["name"] == "mesh-tls")["secret"]
    assert tls["secretName"] == "shop-web-tls"
    assert {(i["key"], i["path"]) for i in tls["items"]} == {("tls.crt", "cert.pem"), ("tls.key", "key.pem"),
                                                             ("ca.crt", "ca.pem")}
    assert app["resources"] == {"limits": {"cpu": "500m", "memory": "128Mi"}}


def test_the_app_gets_the_environment_of_every_runtime(shop: MeshConfig) -> None:
    app = pod_of(by_kind(kubernetes.render(shop))[("Deployment", "shop-orders")])["containers"][0]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15002"
    assert env["NO_PROXY"] == "127.0.0.1,localhost"
    assert env["PORT"] == "9000" and env["MESH_SERVICE"] == "orders" and env["LOG_LEVEL"] == "info"
    instance = next(e for e in app["env"] if e["name"] == "MESH_INSTANCE")
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_replicas_pools_and_jobs(shop: MeshConfig) -> None:
    manifests = kubernetes.render(shop)
    for doc in manifests.documents:
        validate(doc)
    found = by_kind(manifests)
    assert found[("Deployment", "shop-orders")]["spec"]["replicas"] == 3
    pool = found[("Deployment", "shop-convert")]
    assert "replicas" not in pool["spec"]  # the autoscaler's to set; applying again does not undo it
    scaler = found[("HorizontalPodAutoscaler", "shop-convert")]["spec"]
    assert (scaler["minReplicas"], scaler["maxReplicas"]) == (1, 4)
    assert scaler["metrics"][0]["containerResource"] == {
        "name": "cpu", "container": "app", "target": {"type": "AverageValue", "averageValue": "600m"}}
    assert scaler["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 45

    job = found[("Job", "shop-report")]
    assert ("Deployment", "shop-report") not in found and ("Service", "shop-report") not in found
    pod = pod_of(job)
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert pod["initContainers"][0]["restartPolicy"] == "Always"  # stopped once the app exits
    assert pod["initContainers"][0]["readinessProbe"]["exec"]["command"][0] == "python3"  # no app to ask
    registry = yaml.safe_load(found[("ConfigMap", "shop")]["data"]["registry.json"])
    assert registry == {"services": {"web": ["shop-web:15001"], "orders": ["shop-orders:15001"],
                                     "convert": ["shop-convert:15001"]}}


def test_keyed_services_are_left_out_and_said_so(tmp_path: Path) -> None:
    config = write_mesh(tmp_path, MESH + '''
[services.sandbox]
build = "sandbox"
instances = { key = "header:X-Session" }
''')
    manifests = kubernetes.render(config)
    assert not [doc for doc in manifests.documents if doc["metadata"]["labels"].get("mesh.service") == "sandbox"]
    assert "sandbox" not in yaml.safe_load(by_kind(manifests)[("ConfigMap", "shop")]["data"]["registry.json"])[
        "services"]
    assert [note for note in manifests.notes if note.startswith("services.sandbox: not rendered")]


# --- what may reach a pod --------------------------------------------------------------------------

def test_network_policies_let_in_only_the_sidecars_listeners_from_callers(shop: MeshConfig) -> None:
    found = by_kind(kubernetes.render(shop))
    policies = {name: doc["spec"] for (kind, name), doc in found.items() if kind == "NetworkPolicy"}
    assert set(policies) == {"shop-web", "shop-orders", "shop-convert", "shop-report"}
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"] == {"mesh.mesh": "shop", "mesh.service": name.split("-", 1)[1]}
        ports = {port["port"] for rule in spec["ingress"] for port in rule["ports"]}
        assert ports <= SIDECAR_PORTS, (name, ports)
    assert policies["shop-web"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": PUBLIC_PORT}]}]
    assert policies["shop-report"]["ingress"] == []  # a job nobody calls: nothing in
    [orders] = policies["shop-orders"]["ingress"]
    assert orders["ports"] == [{"protocol": "TCP", "port": MESH_PORT}]
    assert orders["from"] == [{"podSelector": {
        "matchLabels": {"mesh.mesh": "shop"},
        "matchExpressions": [{"key": "mesh.service", "operator": "In", "values": ["report", "web"]}]}}]


def test_audit_mode_lets_every_pod_of_the_mesh_reach_the_mesh_listener(tmp_path: Path) -> None:
    config = write_mesh(tmp_path, MESH.replace('name = "shop"', 'name = "shop"\nmode = "audit"'))
    found = by_kind(kubernetes.render(config))
    for name in ("shop-web", "shop-orders"):
        rules = found[("NetworkPolicy", name)]["spec"]["ingress"]
        assert {"from": [{"podSelector": {"matchLabels": {"mesh.mesh": "shop"}}}],
                "ports": [{"protocol": "TCP", "port": MESH_PORT}]} in rules


def test_the_public_service_reaches_the_public_listener(shop: MeshConfig) -> None:
    spec = by_kind(kubernetes.render(shop))[("Service", "shop-web-public")]["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "public", "port": 8080, "targetPort": "public"}]


# --- keys ------------------------------------------------------------------------------------------

def test_secrets_hold_what_the_sidecar_loads(shop: MeshConfig, tmp_path: Path) -> None:
    manifests = kubernetes.render(shop, cert_days=7)
    secret = by_kind(manifests)[("Secret", "shop-web-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    folder = tmp_path / "tls"
    folder.mkdir()
    for key, file_name in (("tls.crt", "cert.pem"), ("tls.key", "key.pem"), ("ca.crt", "ca.pem")):
        (folder / file_name).write_bytes(base64.b64decode(secret["data"][key]))
    Identity(folder, "shop")  # loads the key pair and trusts the CA, as `mesh sidecar --tls` does
    info = describe(folder / "cert.pem")
    assert info.identity == "spiffe://shop/web"
    assert (shop.state_dir / "ca" / "ca.pem").read_bytes() == (folder / "ca.pem").read_bytes()


def test_no_key_material_outside_secrets(shop: MeshConfig, tmp_path: Path) -> None:
    (tmp_path / "plugins" / "signing.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    manifests = kubernetes.render(shop)
    assert any(note.startswith("plugins/signing.pem: left out") for note in manifests.notes)
    for doc in manifests.documents:
        if doc["kind"] == "Secret":
            continue
        text = kubernetes.dump([doc])
        assert "PRIVATE KEY" not in text and "tls.key:" not in text, doc["metadata"]["name"]
        assert "secretKeyRef" not in text
    with_cert_manager = kubernetes.render(shop, cert_manager=True)
    assert not [doc for doc in with_cert_manager.documents if doc["kind"] == "Secret"]
    assert "PRIVATE KEY" not in kubernetes.dump(with_cert_manager.documents)


def test_cert_manager_issues_into_the_secret_the_pod_mounts(shop: MeshConfig) -> None:
    manifests = kubernetes.render(shop, cert_manager=True, cert_days=30)
    for doc in manifests.documents:
        validate(doc)
    found = by_kind(manifests)
    assert found[("Issuer", "shop-selfsigned")]["spec"] == {"selfSigned": {}}
    assert found[("Certificate", "shop")]["spec"]["isCA"] is True
    assert found[("Issuer", "shop")]["spec"] == {"ca": {"secretName": "shop-ca"}}
    spec = found[("Certificate", "shop-web")]["spec"]
    assert spec["uris"] == ["spiffe://shop/web"] and spec["duration"] == "720h"
    assert spec["issuerRef"] == {"name": "shop", "kind": "Issuer", "group": "cert-manager.io"}
    volume = next(v for v in pod_of(found[("Deployment", "shop-web")])["volumes"] if v["name"] == "mesh-tls")
    assert volume["secret"]["secretName"] == spec["secretName"]


# --- the files sidecars read -----------------------------------------------------------------------

def test_the_config_map_puts_each_file_back_at_its_path(shop: MeshConfig, tmp_path: Path) -> None:
    (tmp_path / "plugins" / "sub").mkdir()
    (tmp_path / "plugins" / "sub" / "helper.py").write_text("X = 1\n")
    (tmp_path / "plugins" / "__pycache__").mkdir()
    (tmp_path / "plugins" / "__pycache__" / "stamp.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "plugins" / ".env").write_text("TOKEN=not-for-a-configmap\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.py"
    outside.write_text("Y = 2\n")
    (tmp_path / "plugins" / "linked.py").symlink_to(outside)
    manifests = kubernetes.render(shop)
    assert any(note.endswith(f"a link to outside {tmp_path}") for note in manifests.notes)
    data = by_kind(manifests)[("ConfigMap", "shop")]["data"]
    items = pod_of(by_kind(manifests)[("Deployment", "shop-web")])["volumes"][0]["configMap"]["items"]
    placed = {item["path"]: data[item["key"]] for item in items}
    assert placed == {"mesh.toml": (tmp_path / "mesh.toml").read_text(), "plugins/stamp.py": STAMP,
                      "plugins/sub/helper.py": "X = 1\n"}
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) for key in data)


# --- what cannot be rendered -----------------------------------------------------------------------

def test_problems_are_reported_all_at_once(tmp_path: Path) -> None:
    config = write_mesh(tmp_path, '''
[mesh]
name = "a-rather-long-mesh-name-for-kubernetes"

[services.an-equally-long-service-name]
build = "x"
port = 15001
''')
    with pytest.raises(kubernetes.RenderError) as caught:
        kubernetes.render(config)
    problems = caught.value.problems
    assert any("longer than a DNS label's 63 characters" in p for p in problems)
    assert any(p.startswith("services.an-equally-long-service-name.port: 15001 is the sidecar's") for p in problems)
    assert main(["render", "k8s", str(tmp_path)]) == 2


# --- the command -----------------------------------------------------------------------------------

def test_stdout_is_one_yaml_stream(shop: MeshConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "k8s", str(shop.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n")
    assert "&id" not in out and "*id" not in out  # no anchors: some tools reading manifests have none
    docs = list(yaml.safe_load_all(out))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs][:2] == [("ConfigMap", "shop"), ("Secret", "shop-web-tls")]
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret", "Service", "NetworkPolicy", "Deployment",
                                         "HorizontalPodAutoscaler", "Job"}
    for doc in docs:
        validate(doc)


def test_output_folder_gets_a_file_per_service(shop: MeshConfig, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k8s"
    assert main(["render", "k8s", str(shop.path), "-o", str(out), "--cert-manager"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["shop-convert.yaml", "shop-orders.yaml", "shop-report.yaml", "shop-web.yaml", "shop.yaml"]
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / name}" for name in
                                                    ["shop.yaml", "shop-web.yaml", "shop-orders.yaml",
                                                     "shop-convert.yaml", "shop-report.yaml"]]
    kinds = [d["kind"] for d in yaml.safe_load_all((out / "shop.yaml").read_text())]
    assert kinds == ["ConfigMap", "Issuer", "Certificate", "Issuer"]
    assert main(["render", "k8s", str(shop.path), "-o", str(out)]) == 0
    web = out / "shop-web.yaml"
    assert stat.S_IMODE(web.stat().st_mode) == 0o600  # it holds the service's key now
    assert stat.S_IMODE((out / "shop.yaml").stat().st_mode) == 0o644
    assert [d["kind"] for d in yaml.safe_load_all(web.read_text())] == [
        "Secret", "Service", "Service", "NetworkPolicy", "Deployment"]


def test_notes_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mesh(tmp_path, '''
[mesh]
name = "plain"

[services.api]
command = "python api.py"
''')
    assert main(["render", "k8s", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "note: services.api: no 'build' or 'image'; its pods run mesh-plain-api:latest" in captured.err
    assert list(yaml.safe_load_all(captured.out))
