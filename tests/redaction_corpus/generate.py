"""Writes the redaction corpus: realistic kubectl output with seeded secrets, and the truth.

    python -m tests.redaction_corpus.generate      # rewrites docs/ and ground_truth.json

Deterministic (one seeded random.Random): the committed files are exactly what this
writes, and tests/unit/test_redaction_corpus.py checks that. Each document is what a
user would paste or pipe into `vibectl ask`: `kubectl get -o yaml/json` of pods,
deployments, services, configmaps, secrets, nodes and events, `describe` output,
container logs and kubeconfigs. `ground_truth.json` lists every seeded secret (kind,
document, the exact text inserted) and, per document, values that look technical but
are not secrets (image digests, UIDs, resourceVersions, pod-template hashes, CA
certificates, non-credential base64) and must come through unchanged.
"""

# ruff: noqa: E501 - the documents are kubectl output, whose lines are long

from __future__ import annotations

import base64
import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261128
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"


@dataclass
class Doc:
    name: str
    text: str = ""
    secrets: list[tuple[str, str]] = field(default_factory=list)  # (kind, inserted text)
    keep: list[str] = field(default_factory=list)  # non-secrets that must survive


class Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.turn = 0

    # ---- values ----
    def s(self, n: int, alphabet: str = ALNUM) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def name(self) -> str:
        return self.r.choice(["web", "api", "worker", "billing", "auth", "cart", "search"]) + (
            "-" + self.r.choice(["svc", "app", "backend", "frontend", "jobs", "v2"])
        )

    def uid(self) -> str:
        h = self.s(32, "0123456789abcdef")
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def digest(self) -> str:
        return "sha256:" + self.s(64, "0123456789abcdef")

    def rv(self) -> str:
        return str(self.r.randint(1000, 99_999_999))

    def hash10(self) -> str:
        return self.s(10, "0123456789bcdfghjklmnpqrstvwxz")

    def ts(self) -> str:
        return f"2026-{self.r.randint(1, 11):02d}-{self.r.randint(1, 28):02d}T{self.r.randint(0, 23):02d}:{self.r.randint(0, 59):02d}:{self.r.randint(0, 59):02d}Z"

    def b64(self, raw: str) -> str:
        return base64.b64encode(raw.encode()).decode()

    def cert(self, indent: str = "") -> str:
        lines = [self.s(64, B64) for _ in range(self.r.randint(6, 12))] + [self.s(20, B64) + "=="]
        body = "\n".join(indent + x for x in lines)
        return f"-----BEGIN CERTIFICATE-----\n{body}\n{indent}-----END CERTIFICATE-----"

    # ---- secrets: kind -> a fresh value ----
    def jwt(self) -> str:
        def part(obj: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        head = part({"alg": self.r.choice(["RS256", "EdDSA", "HS256"]), "kid": self.s(8)})
        body = part({"sub": f"system:serviceaccount:default:{self.name()}", "exp": 1800000000})
        return f"{head}.{body}.{self.s(43, ALNUM + '-_')}"

    def private_key(self, indent: str = "") -> str:
        label = self.r.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
        lines = [self.s(64, B64) for _ in range(self.r.randint(4, 10))] + [self.s(12, B64) + "="]
        body = "\n".join(indent + x for x in lines)
        return (
            f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n{indent}-----END {label}PRIVATE KEY-----"
        )

    def password(self) -> str:
        head = self.s(1, string.ascii_letters)
        return head + self.s(self.r.randint(10, 20), ALNUM + "!#%*_-") + self.s(1, string.digits)

    def aws_id(self) -> str:
        return self.r.choice(["AKIA", "ASIA"]) + self.s(16, string.ascii_uppercase + string.digits)

    def aws_secret(self) -> str:
        return self.s(40, B64)

    def github(self) -> str:
        if self.r.random() < 0.7:
            return self.r.choice(["ghp_", "gho_", "ghs_", "ghu_"]) + self.s(36)
        return "github_pat_" + self.s(22) + "_" + self.s(59)

    def gitlab(self) -> str:
        return "glpat-" + self.s(20, ALNUM + "-_")

    def slack(self) -> str:
        n = self.r.randint
        return f"xox{self.r.choice('bpa')}-{n(10**9, 10**10)}-{n(10**11, 10**12)}-{self.s(24)}"

    def openai(self) -> str:
        return (
            self.r.choice(["sk-proj-", "sk-", "sk-svcacct-"]) + self.s(40) + self.s(2, "0123456789")
        )

    def anthropic(self) -> str:
        return "sk-ant-api03-" + self.s(86, ALNUM + "-_") + "AA"

    def google(self) -> str:
        return "AIza" + self.s(35, ALNUM + "-_")

    def bearer(self) -> str:
        return self.s(30) + self.s(2, "0123456789")


# ---- documents ----


def _meta(g: Gen, d: Doc, kind: str, name: str, indent: str = "  ") -> str:
    uid, rv = g.uid(), g.rv()
    d.keep += [uid, rv]
    return (
        f'{indent[:-2]}metadata:\n{indent}creationTimestamp: "{g.ts()}"\n'
        f"{indent}name: {name}\n{indent}namespace: {g.r.choice(['default', 'prod', 'shop'])}\n"
        f'{indent}resourceVersion: "{rv}"\n{indent}uid: {uid}\n'
    )


def _env_secret(g: Gen, d: Doc) -> tuple[str, str]:
    """(env var name, value) of one seeded secret, recorded in the document."""
    table: list[tuple[str, str, Callable[[], str]]] = [
        ("password", "DB_PASSWORD", g.password),
        ("aws_secret_key", "AWS_SECRET_ACCESS_KEY", g.aws_secret),
        ("aws_access_key_id", "AWS_ACCESS_KEY_ID", g.aws_id),
        ("github_token", "GITHUB_TOKEN", g.github),
        ("gitlab_token", "GITLAB_TOKEN", g.gitlab),
        ("slack_token", "SLACK_BOT_TOKEN", g.slack),
        ("openai_key", "OPENAI_API_KEY", g.openai),
        ("anthropic_key", "ANTHROPIC_API_KEY", g.anthropic),
        ("google_api_key", "GOOGLE_MAPS_KEY", g.google),
        ("jwt", "SERVICE_JWT", g.jwt),
        ("auth_header", "UPSTREAM_AUTH", g.bearer),
        ("private_key", "TLS_KEY", g.private_key),
    ]
    kind, var, make = table[g.turn % len(table)]  # in turn: every kind equally often
    g.turn += 1
    value = make()
    d.secrets.append((kind, value))
    if kind == "auth_header":
        return var, f"Bearer {value}"
    return var, value


def _url(g: Gen, d: Doc) -> str:
    pw = g.password().replace("#", "x").replace("%", "y")
    d.secrets.append(("url_password", pw))
    scheme = g.r.choice(["postgres", "postgresql", "mysql", "redis", "amqp", "mongodb+srv"])
    return f"{scheme}://app:{pw}@db.{g.name()}.svc:5432/app"


def pod(g: Gen, d: Doc, as_json: bool, secrets: bool) -> None:
    name, h = g.name(), g.hash10()
    digest = g.digest()
    d.keep += [digest, h]
    env: list[dict[str, object]] = [{"name": "LOG_LEVEL", "value": "info"}]
    env.append(
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"key": "password", "name": "db"}}}
    )
    args = ["--port=8080"]
    if secrets:
        for _ in range(g.r.randint(7, 11)):
            var, value = _env_secret(g, d)
            env.append({"name": var, "value": value})
        env.append({"name": "DATABASE_URL", "value": _url(g, d)})
        pw = g.password()
        d.secrets.append(("password", pw))
        args.append(f"--admin-password={pw}")
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": g.ts(),
            "labels": {"app": name, "pod-template-hash": h},
            "name": f"{name}-{h}-{g.s(5, 'bcdfghjklmnpqrstvwxz2456789')}",
            "namespace": "default",
            "resourceVersion": g.rv(),
            "uid": g.uid(),
        },
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "args": args,
                    "env": env,
                    "image": f"registry.example.com/{name}@{digest}",
                    "name": name,
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "volumeMounts": [{"mountPath": "/etc/tls", "name": "tls", "readOnly": True}],
                }
            ],
            "serviceAccountName": name,
            "volumes": [
                {"name": "tls", "secret": {"defaultMode": 420, "secretName": f"{name}-tls"}}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": f"10.244.{g.r.randint(0, 9)}.{g.r.randint(2, 250)}",
        },
    }
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    d.keep += [str(meta["uid"]), str(meta["resourceVersion"])]
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def to_yaml(obj: object, indent: int = 0) -> str:
    """kubectl's YAML style for plain data: sorted keys, `- ` lists, block scalars."""
    pad = " " * indent
    out: list[str] = []
    if isinstance(obj, dict):
        for k in sorted(obj):
            v = obj[k]
            if isinstance(v, dict | list) and v:
                out.append(
                    f"{pad}{k}:\n{to_yaml(v, indent + 2 if isinstance(v, dict) else indent)}"
                )
            else:
                out.append(f"{pad}{k}:{_scalar(v, indent + 2)}\n")
        return "".join(out)
    assert isinstance(obj, list)
    for item in obj:
        body = to_yaml(item, indent + 2) if isinstance(item, dict | list) else f"{pad}  {item}\n"
        out.append(pad + "- " + body[indent + 2 :])
    return "".join(out)


def _scalar(v: object, indent: int) -> str:
    if isinstance(v, bool):
        return " true" if v else " false"
    if isinstance(v, int):
        return f" {v}"
    if isinstance(v, dict):
        return " {}"
    if isinstance(v, list):
        return " []"
    s = str(v)
    if "\n" in s:
        pad = " " * indent
        return " |\n" + "".join(f"{pad}{line}\n" for line in s.rstrip("\n").split("\n"))[:-1]
    if s[:1].isdigit() or s in ("true", "false") or ": " in s or s.startswith("{"):
        return f" {json.dumps(s)}"
    return f" {s}"


def secret(g: Gen, d: Doc, as_json: bool) -> None:
    name = g.name()
    kind = g.r.choice(["opaque", "tls", "sa", "docker", "string"])
    data: dict[str, str] = {}
    string_data: dict[str, str] = {}
    typ = "Opaque"
    if kind == "opaque":
        for key in g.r.sample(["password", "username", "api-key", "host", "db-url"], 3):
            data[key] = g.b64(g.password() if key != "db-url" else "postgres://u:x@h/db")
    elif kind == "tls":
        typ = "kubernetes.io/tls"
        data["tls.crt"] = g.b64(g.cert())
        data["tls.key"] = g.b64(g.private_key())
    elif kind == "sa":
        typ = "kubernetes.io/service-account-token"
        data["ca.crt"] = g.b64(g.cert())
        data["namespace"] = g.b64("default")
        data["token"] = g.b64(g.jwt())
    elif kind == "docker":
        typ = "kubernetes.io/dockerconfigjson"
        auth = g.b64(f"robot:{g.password()}")
        data[".dockerconfigjson"] = g.b64(
            json.dumps({"auths": {"registry.example.com": {"auth": auth}}})
        )
    else:
        string_data["config.yaml"] = f"user: app\nlevel: {g.password()}\n"
        string_data["token"] = g.s(40)
        data["extra"] = g.b64(g.password())
    for value in [*data.values(), *string_data.values()]:
        d.secrets.append(("k8s_secret", value))
    obj: dict[str, object] = {"apiVersion": "v1", "kind": "Secret", "type": typ}
    if data:
        obj["data"] = data
    if string_data:
        obj["stringData"] = string_data
    meta: dict[str, object] = {
        "name": name,
        "namespace": "default",
        "uid": g.uid(),
        "resourceVersion": g.rv(),
    }
    d.keep += [str(meta["uid"]), str(meta["resourceVersion"])]
    if g.r.random() < 0.4:
        applied = {
            "apiVersion": "v1",
            "data": data,
            "kind": "Secret",
            "metadata": {"name": name},
            "type": typ,
        }
        meta["annotations"] = {
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                applied, separators=(",", ":")
            )
            + "\n"
        }
    obj["metadata"] = meta
    wrap = g.r.random() < 0.3
    if wrap:
        obj = {
            "apiVersion": "v1",
            "items": [obj, configmap_obj(g, d)],
            "kind": "List",
            "metadata": {"resourceVersion": ""},
        }
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def configmap_obj(g: Gen, d: Doc) -> dict[str, object]:
    cert = g.cert()
    blob = g.b64(json.dumps({"feature": g.name(), "enabled": True, "weight": g.r.randint(1, 9)}))
    d.keep += [blob, *cert.split("\n")]
    data = {"ca.crt": cert, "settings.b64": blob, "LOG_LEVEL": "debug", "retries": "3"}
    meta = {
        "name": "kube-root-ca.crt" if g.r.random() < 0.5 else g.name(),
        "uid": g.uid(),
        "resourceVersion": g.rv(),
    }
    d.keep += [meta["uid"], meta["resourceVersion"]]
    return {"apiVersion": "v1", "data": data, "kind": "ConfigMap", "metadata": meta}


def configmap(g: Gen, d: Doc, as_json: bool, secrets: bool) -> None:
    obj = configmap_obj(g, d)
    data = obj["data"]
    assert isinstance(data, dict)
    if secrets:
        data["DATABASE_URL"] = _url(g, d)
        pw = g.password()
        d.secrets.append(("password", pw))
        data["app.properties"] = (
            f"spring.datasource.username=app\nspring.datasource.password={pw}\n"
        )
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def deployment(g: Gen, d: Doc, as_json: bool, secrets: bool) -> None:
    p = Doc("x")
    pod(g, p, True, secrets)
    d.secrets += p.secrets
    d.keep += p.keep
    spec = json.loads(p.text)["spec"]
    name = g.name()
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"generation": 3, "name": name, "uid": g.uid(), "resourceVersion": g.rv()},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
        "status": {"availableReplicas": 3, "observedGeneration": 3, "readyReplicas": 3},
    }
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    d.keep += [str(meta["uid"]), str(meta["resourceVersion"])]
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def service(g: Gen, d: Doc, as_json: bool) -> None:
    name = g.name()
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "uid": g.uid(), "resourceVersion": g.rv()},
        "spec": {
            "clusterIP": f"10.96.{g.r.randint(0, 255)}.{g.r.randint(1, 254)}",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
    }
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    d.keep += [str(meta["uid"]), str(meta["resourceVersion"])]
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def node(g: Gen, d: Doc, as_json: bool) -> None:
    images = []
    for _ in range(6):
        digest = g.digest()
        d.keep.append(digest)
        images.append(
            {
                "names": [f"docker.io/library/{g.name()}@{digest}"],
                "sizeBytes": g.r.randint(10**6, 10**9),
            }
        )
    obj = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": f"node-{g.r.randint(1, 9)}",
            "uid": g.uid(),
            "resourceVersion": g.rv(),
        },
        "spec": {"podCIDR": "10.244.1.0/24", "providerID": f"kind://docker/kind/node-{g.s(6)}"},
        "status": {
            "allocatable": {"cpu": "2", "memory": "8000000Ki", "pods": "110"},
            "conditions": [
                {
                    "message": "kubelet has sufficient memory available",
                    "reason": "KubeletHasSufficientMemory",
                    "status": "False",
                    "type": "MemoryPressure",
                },
                {
                    "message": "kubelet is posting ready status",
                    "reason": "KubeletReady",
                    "status": "True",
                    "type": "Ready",
                },
            ],
            "images": images,
            "nodeInfo": {
                "bootID": g.uid(),
                "machineID": g.s(32, "0123456789abcdef"),
                "kubeletVersion": "v1.30.2",
            },
        },
    }
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    d.keep += [str(meta["uid"]), str(meta["resourceVersion"])]
    d.text = json.dumps(obj, indent=4) + "\n" if as_json else to_yaml(obj)


def events(g: Gen, d: Doc) -> None:
    rows = ["LAST SEEN   TYPE      REASON             OBJECT                     MESSAGE"]
    for _ in range(g.r.randint(8, 20)):
        name, h = g.name(), g.hash10()
        d.keep.append(h)
        digest = g.digest()
        d.keep.append(digest)
        rows.append(
            g.r.choice(
                [
                    f'{g.r.randint(1, 59)}s         Normal    Pulled             pod/{name}-{h}-abcde   Container image "registry.example.com/{name}@{digest}" already present on machine',
                    f'{g.r.randint(1, 59)}m         Warning   FailedMount        pod/{name}-{h}-abcde   MountVolume.SetUp failed for volume "secret-vol" : secret "{name}-creds" not found',
                    f"{g.r.randint(1, 59)}s         Warning   BackOff            pod/{name}-{h}-abcde   Back-off restarting failed container {name} in pod {name}-{h}-abcde",
                    f"{g.r.randint(1, 9)}m          Normal    ScalingReplicaSet  deployment/{name}        Scaled up replica set {name}-{h} to 3",
                ]
            )
        )
    d.text = "\n".join(rows) + "\n"


def describe_pod(g: Gen, d: Doc, secrets: bool) -> None:
    name, h, digest = g.name(), g.hash10(), g.digest()
    d.keep += [h, digest]
    env = [
        "      LOG_LEVEL:     info",
        "      DB_PASSWORD:   <set to the key 'password' in secret 'db'>  Optional: false",
    ]
    if secrets:
        for _ in range(g.r.randint(7, 11)):
            var, value = _env_secret(g, d)
            env.append(f"      {var}:  {value}")
    d.text = f"""Name:             {name}-{h}-x2k9p
Namespace:        default
Priority:         0
Service Account:  {name}
Node:             node-2/172.18.0.3
Start Time:       Mon, 04 Nov 2026 10:00:03 +0000
Labels:           app={name}
                  pod-template-hash={h}
Status:           Running
IP:               10.244.1.17
Controlled By:  ReplicaSet/{name}-{h}
Containers:
  {name}:
    Container ID:   containerd://{g.s(64, "0123456789abcdef")}
    Image:          registry.example.com/{name}@{digest}
    Image ID:       registry.example.com/{name}@{digest}
    Port:           8080/TCP
    State:          Waiting
      Reason:       CrashLoopBackOff
    Last State:     Terminated
      Reason:       Error
      Exit Code:    1
    Ready:          False
    Restart Count:  7
    Environment:
{chr(10).join(env)}
    Mounts:
      /var/run/secrets/kubernetes.io/serviceaccount from kube-api-access-{g.s(5, "abcdefghijklmnopqrstuvwxyz")} (ro)
Volumes:
  kube-api-access:
    Type:                    Projected (a volume that contains injected data from multiple sources)
    TokenExpirationSeconds:  3607
    ConfigMapName:           kube-root-ca.crt
  secret-vol:
    Type:        Secret (a volume populated by a Secret)
    SecretName:  {name}-creds
    Optional:    false
Events:
  Type     Reason   Age                From     Message
  ----     ------   ----               ----     -------
  Warning  BackOff  2m (x25 over 7m)   kubelet  Back-off restarting failed container {name} in pod {name}-{h}-x2k9p
"""


def describe_secret(g: Gen, d: Doc) -> None:
    d.text = f"""Name:         {g.name()}-creds
Namespace:    default
Labels:       <none>
Annotations:  <none>

Type:  Opaque

Data
====
password:  {g.r.randint(8, 30)} bytes
username:  5 bytes
"""


def logs(g: Gen, d: Doc, secrets: bool) -> None:
    lines = []
    for i in range(g.r.randint(10, 30)):
        t = g.ts()
        lines.append(
            g.r.choice(
                [
                    f"{t} INFO  request_id={g.s(16, '0123456789abcdef')} GET /healthz 200 1.2ms",
                    f"{t} WARN  retrying connection to db.prod.svc:5432 (attempt {i})",
                    f"{t} INFO  loaded config sha256={g.s(64, '0123456789abcdef')}",
                    f'{t} ERROR password authentication failed for user "app"',
                    f"{t} INFO  token refresh scheduled in 300s",
                ]
            )
        )
    if secrets:
        for _ in range(g.r.randint(6, 10)):
            t = g.ts()
            pick = g.r.randrange(8)
            if pick == 0:
                tok = g.jwt()
                d.secrets.append(("jwt", tok))
                lines.append(f'{t} DEBUG outgoing headers: {{"Authorization": "Bearer {tok}"}}')
            elif pick == 1:
                tok = g.bearer()
                d.secrets.append(("auth_header", tok))
                lines.append(f"{t} DEBUG > Authorization: Bearer {tok}")
            elif pick == 2:
                lines.append(f"{t} INFO  connecting to {_url(g, d)}")
            elif pick == 3:
                pw = g.password()
                d.secrets.append(("password", pw))
                lines.append(f"{t} DEBUG env PASSWORD={pw} HOME=/root")
            elif pick == 4:
                pw = g.password()
                d.secrets.append(("password", pw))
                lines.append(f'{t} DEBUG config: {{"user": "app", "password": "{pw}", "pool": 5}}')
            elif pick == 5:
                key = g.private_key()
                d.secrets.append(("private_key", key))
                lines.append(f"{t} DEBUG loaded key:\n{key}")
            elif pick == 6:
                var, value = _env_secret(g, d)
                lines.append(f"{t} DEBUG {var}={value}")
            else:
                tok = g.jwt()
                d.secrets.append(("jwt", tok))
                lines.append(f"{t} WARN  rejected token {tok}: expired")
    d.text = "\n".join(lines) + "\n"


def env_dump(g: Gen, d: Doc) -> None:
    """`kubectl exec POD -- env`: plain variables and one secret of each kind in the table."""
    name, h = g.name(), g.hash10()
    d.keep.append(h)
    lines = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"HOSTNAME={name}-{h}-x2k9p",
        "KUBERNETES_SERVICE_HOST=10.96.0.1",
        "KUBERNETES_PORT=tcp://10.96.0.1:443",
        f"POD_TEMPLATE_HASH={h}",
        f"DATABASE_URL={_url(g, d)}",
    ]
    for _ in range(12):
        var, value = _env_secret(g, d)
        lines.append(f"{var}={value}")
    g.r.shuffle(lines)
    d.text = "\n".join(["HOME=/root", *lines]) + "\n"


def kubeconfig(g: Gen, d: Doc) -> None:
    ca = g.b64(g.cert())
    d.keep.append(ca)
    users = []
    for i in range(g.r.randint(3, 5)):
        pick = g.r.randrange(4)
        if pick == 0:
            cert, key = g.b64(g.cert()), g.b64(g.private_key())
            d.secrets += [("kubeconfig", cert), ("kubeconfig", key)]
            users.append(
                f"- name: user-{i}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}"
            )
        elif pick == 1:
            tok = g.jwt()
            d.secrets.append(("jwt", tok))
            users.append(f"- name: user-{i}\n  user:\n    token: {tok}")
        elif pick == 2:
            tok = f"{g.s(6, 'abcdefghijklmnopqrstuvwxyz0123456789')}.{g.s(16, 'abcdefghijklmnopqrstuvwxyz0123456789')}"
            d.secrets.append(("kubeconfig", tok))
            users.append(f"- name: user-{i}\n  user:\n    token: {tok}")
        else:
            pw = g.password()
            d.secrets.append(("password", pw))
            users.append(f"- name: user-{i}\n  user:\n    password: {pw}\n    username: admin")
    d.text = f"""apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://10.0.0.{g.r.randint(2, 250)}:6443
  name: prod
contexts:
- context:
    cluster: prod
    user: user-0
  name: prod
current-context: prod
kind: Config
preferences: {{}}
users:
{chr(10).join(users)}
"""


def build() -> list[Doc]:
    g = Gen(SEED)
    docs: list[Doc] = []

    def add(kind: str, fill: Callable[..., None], *args: bool) -> None:
        d = Doc(f"{len(docs):03d}-{kind}.txt")
        fill(g, d, *args)
        docs.append(d)

    for i in range(40):
        add("pod-yaml", pod, False, i % 3 != 0)
        add("pod-json", pod, True, i % 3 == 1)
        add("secret-yaml", secret, False)
        add("secret-json", secret, True)
        add("logs", logs, i % 4 != 0)
        add("kubeconfig", kubeconfig)
        add("describe-pod", describe_pod, i % 2 == 0)
    for i in range(12):
        form = "json" if i % 2 == 0 else "yaml"
        add(f"deployment-{form}", deployment, form == "json", i % 3 == 0)
        add(f"configmap-{form}", configmap, form == "json", i % 4 == 1)
        add(f"service-{form}", service, form == "json")
        add(f"node-{form}", node, form == "json")
        add("events", events)
        add("describe-secret", describe_secret)
    for _ in range(60):
        add("exec-env", env_dump)
    return docs


def _as_inserted(value: str, text: str) -> list[str]:
    """The text a value became in the document: itself, JSON-escaped, or its lines."""
    escaped = json.dumps(value)[1:-1]
    if value in text:
        return [value]
    if escaped in text:
        return [escaped]
    lines = [line for line in value.split("\n") if line]
    assert all(line in text for line in lines), value
    return lines


def write(directory: Path) -> None:
    docs = build()
    out = directory / "docs"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.txt"):
        old.unlink()
    truth: dict[str, object] = {"seed": SEED, "secrets": [], "keep": {}}
    secrets = truth["secrets"]
    keep = truth["keep"]
    assert isinstance(secrets, list) and isinstance(keep, dict)
    for d in docs:
        (out / d.name).write_text(d.text)
        for kind, value in d.secrets:
            inserted = _as_inserted(value, d.text)
            shown = inserted[0] if len(inserted) == 1 else inserted
            secrets.append({"kind": kind, "document": d.name, "value": shown})
        keep[d.name] = sorted(set(d.keep))
    (directory / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
