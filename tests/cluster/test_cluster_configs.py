"""The cluster launcher configs, the AWS stack, the IAM policy, the KubeRay manifests and the runtime env.

Ray's own offline check (``prepare_config`` then ``validate_config``) runs first; it does not look
inside ``node_config``, does not require a region, and accepts GPU workers that declare no resources,
so those are checked here: AWS node configs against botocore's own RunInstances model, GCP node
configs against the fields of the Compute Engine instance resource, and the security rules (no port
open to the world, token authentication, dashboard on loopback, one bucket) by reading the files.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import botocore.session
import botocore.validate
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
# Instance shapes and what Ray must be told they hold (vCPUs, GPUs): A100 40 GB nodes.
SHAPES = {"p4d.24xlarge": (96, 8), "a2-highgpu-1g": (12, 1)}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def strings(tree: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a parsed YAML/JSON tree, with its dotted path."""
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list):
        return [s for i, v in enumerate(tree) for s in strings(v, f"{path}[{i}]")]
    return [(path, tree)] if isinstance(tree, str) else []


# ---------------------------------------------------------------- the checks Ray's validation misses
EC2_RUN_INSTANCES = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape

# Fields of the Compute Engine instance resource (compute v1 Instance) that a Ray node_config may
# carry, and of its nested objects used here; anything else is a typo the API would refuse at launch.
GCE_INSTANCE = {
    "machineType", "disks", "networkInterfaces", "metadata", "scheduling", "serviceAccounts", "guestAccelerators",
    "labels", "tags", "minCpuPlatform", "shieldedInstanceConfig", "confidentialInstanceConfig", "advancedMachineFeatures",
    "reservationAffinity", "resourcePolicies", "canIpForward", "deletionProtection", "description", "hostname",
}  # fmt: skip
GCE_NESTED = {
    "disks[]": {"boot", "autoDelete", "type", "mode", "deviceName", "initializeParams", "interface", "source", "diskSizeGb"},
    "disks[].initializeParams": {"diskSizeGb", "sourceImage", "diskType", "labels", "diskName", "provisionedIops"},
    "networkInterfaces[]": {"network", "subnetwork", "accessConfigs", "networkIP", "nicType", "stackType"},
    "networkInterfaces[].accessConfigs[]": {"name", "type", "natIP", "networkTier"},
    "metadata": {"items"},
    "metadata.items[]": {"key", "value"},
    "scheduling": {
        "onHostMaintenance",
        "automaticRestart",
        "preemptible",
        "provisioningModel",
        "instanceTerminationAction",
        "maxRunDuration",
    },
    "serviceAccounts[]": {"email", "scopes"},
    "guestAccelerators[]": {"acceleratorType", "acceleratorCount"},
}


def aws_node_config_errors(node_config: dict) -> list[str]:
    """What EC2 RunInstances would refuse in a node config (unknown or mistyped fields, bad enums)."""
    try:
        # Ray adds MinCount/MaxCount itself when it launches.
        botocore.validate.validate_parameters({**node_config, "MinCount": 1, "MaxCount": 1}, EC2_RUN_INSTANCES)
    except botocore.exceptions.ParamValidationError as exc:
        return [str(exc)]
    enum = EC2_RUN_INSTANCES.members["InstanceType"].enum
    if enum and node_config.get("InstanceType") not in enum:
        return [f"InstanceType {node_config.get('InstanceType')!r} is not an EC2 instance type"]
    return []


def gce_node_config_errors(node_config: dict) -> list[str]:
    """Unknown fields in a GCP node config, at the top level and in the nested objects Ray passes on."""
    errors = [f"unknown instance field {k!r}" for k in node_config if k not in GCE_INSTANCE]

    def walk(value: Any, path: str) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, path + "[]")
        elif isinstance(value, dict) and path in GCE_NESTED:
            errors.extend(f"unknown field {path}.{k}" for k in value if k not in GCE_NESTED[path])
            for k, v in value.items():
                walk(v, f"{path}.{k}")

    for key, value in node_config.items():
        walk(value, key)
    return errors


def launcher_errors(name: str, cfg: dict) -> list[str]:
    """Everything this project requires of a launcher config beyond Ray's schema."""
    errors: list[str] = []
    provider = cfg.get("provider", {})
    kind = provider.get("type")
    if not provider.get("region"):
        errors.append("provider.region is missing")
    zones = [z for z in str(provider.get("availability_zone", "")).split(",") if z]
    if not zones or any(not z.startswith(str(provider.get("region"))) for z in zones):
        errors.append("provider.availability_zone must be zones of provider.region")
    if kind == "gcp" and not provider.get("project_id"):
        errors.append("provider.project_id is missing")
    head = cfg.get("head_node_type")
    for node_type, spec in cfg.get("available_node_types", {}).items():
        nc, res = spec.get("node_config", {}), spec.get("resources") or {}
        errors += [f"{node_type}: {e}" for e in (aws_node_config_errors(nc) if kind == "aws" else gce_node_config_errors(nc))]
        shape = nc.get("InstanceType") or nc.get("machineType")
        if node_type == head:
            if res.get("GPU", 0) != 0:
                errors.append(f"{node_type}: the head must not offer GPUs")
            continue
        if spec.get("min_workers", 0) != 0:
            errors.append(f"{node_type}: min_workers must be 0 (GPU nodes only while there is work)")
        if "GPU" not in res or "CPU" not in res:
            errors.append(f"{node_type}: declare resources CPU and GPU, or the autoscaler cannot plan GPU work")
        elif shape in SHAPES and (res["CPU"], res["GPU"]) != SHAPES[shape]:
            errors.append(f"{node_type}: resources {res} do not match {shape} {SHAPES[shape]}")
        elif shape not in SHAPES:
            errors.append(f"{node_type}: {shape!r} is not an A100 40 GB shape {sorted(SHAPES)}")
    starts = cfg.get("head_start_ray_commands", []) + cfg.get("worker_start_ray_commands", [])
    for cmd in (c for c in starts if "ray start" in c):
        if "RAY_AUTH_MODE=token" not in cmd:
            errors.append(f"token authentication off in {cmd!r}")
    head_start = " ".join(c for c in cfg.get("head_start_ray_commands", []) if "--head" in c)
    if "--dashboard-host=127.0.0.1" not in head_start:
        errors.append("the head's dashboard must be bound to 127.0.0.1")
    if "~/.ray/auth_token" not in cfg.get("file_mounts", {}):
        errors.append("file_mounts must bring the Ray token (~/.ray/auth_token) to every node")
    errors += [f"{p} opens something to the world: {s!r}" for p, s in strings(cfg) if "0.0.0.0" in s]
    return errors


# ---------------------------------------------------------------- launcher configs
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_validation(name):
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # prepare_config fills what a config leaves out from Ray's defaults, whose head command binds the
    # dashboard to 0.0.0.0: the configs must set their own start commands.
    assert all("0.0.0.0" not in c for c in prepared["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_the_checks_ray_misses(name):
    assert launcher_errors(name, load(name)) == []


@pytest.mark.parametrize(
    "name, mutate, expected",
    [
        ("aws.yaml", lambda c: c["available_node_types"]["a100"]["node_config"].update(InstanceTyp="p4d.24xlarge"), 'Unknown parameter in input: "InstanceTyp"'),
        ("aws.yaml", lambda c: c["available_node_types"]["a100"]["node_config"].update(MetadataOptions={"HttpToken": "required"}), "HttpToken"),
        ("aws.yaml", lambda c: c["available_node_types"]["a100"]["node_config"].update(InstanceType="p4d.24xlrge"), "not an EC2 instance type"),
        ("aws.yaml", lambda c: c["provider"].pop("region"), "provider.region is missing"),
        ("gcp.yaml", lambda c: c["available_node_types"]["a100"].pop("resources") and c["available_node_types"]["a100"].update(resources={}), "declare resources"),
        ("gcp.yaml", lambda c: c["available_node_types"]["a100"]["node_config"].update(machinType="a2-highgpu-1g"), "machinType"),
        ("gcp.yaml", lambda c: c["available_node_types"]["a100"]["node_config"]["scheduling"].update(onHostMaintainance="TERMINATE"), "onHostMaintainance"),
        ("gcp.yaml", lambda c: c["provider"].update(project_id=None), "project_id"),
        ("gcp.yaml", lambda c: c["available_node_types"]["a100"].update(min_workers=1), "min_workers must be 0"),
        ("aws.yaml", lambda c: c["available_node_types"]["a100"]["resources"].update(GPU=4), "do not match p4d.24xlarge"),
        ("aws.yaml", lambda c: c["head_start_ray_commands"].__setitem__(1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")), "127.0.0.1"),
        ("aws.yaml", lambda c: c["worker_start_ray_commands"].__setitem__(1, c["worker_start_ray_commands"][1].replace("RAY_AUTH_MODE=token ", "")), "token authentication off"),
        ("aws.yaml", lambda c: c["provider"]["security_group"].update(IpPermissions=[{"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]), "to the world"),
    ],
)  # fmt: skip
def test_the_checks_catch_what_ray_lets_through(name, mutate, expected):
    """Each broken config still passes Ray's own validation, and is caught here."""
    cfg = load(name)
    mutate(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray: fine
    errors = launcher_errors(name, cfg)
    assert any(expected in e for e in errors), errors


# ---------------------------------------------------------------- AWS network and IAM
def test_aws_stack_opens_only_ssh_from_the_admin_cidr_and_lints_clean():
    stack = load("aws-stack.yaml")
    res = stack["Resources"]
    sg = res["NodeSecurityGroup"]["Properties"]
    # aws.yaml names this group; Ray uses an existing group as it is (a missing one it would create
    # with SSH open to 0.0.0.0/0, hence the stack).
    assert load("aws.yaml")["provider"]["security_group"] == {"GroupName": sg["GroupName"]}
    assert sg["SecurityGroupIngress"] == [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "CidrIp": {"Ref": "AdminCidr"},
            "Description": sg["SecurityGroupIngress"][0]["Description"],
        }
    ]
    ingress = [r for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert [r["Properties"]["SourceSecurityGroupId"] for r in ingress] == [{"Fn::GetAtt": ["NodeSecurityGroup", "GroupId"]}]
    # The only 0.0.0.0 in the stack is the rule that refuses it as AdminCidr.
    assert [p for p, s in strings(stack) if "0.0.0.0" in s] == [
        "Rules.NotTheWorld.Assertions[0].Assert.Fn::Not[0].Fn::Equals[1]", "Rules.NotTheWorld.Assertions[0].AssertDescription"]  # fmt: skip
    # The node types use the stack's instance profiles: the head may launch workers, workers may not.
    profiles = {r["Properties"]["InstanceProfileName"] for r in res.values() if r["Type"] == "AWS::IAM::InstanceProfile"}
    nodes = load("aws.yaml")["available_node_types"]
    assert {t: n["node_config"]["IamInstanceProfile"]["Name"] for t, n in nodes.items()} == {
        "head": "dtrak-ray-head", "a100": "dtrak-ray-worker", "a100_spot": "dtrak-ray-worker"}  # fmt: skip
    assert profiles == {"dtrak-ray-head", "dtrak-ray-worker"}
    lint = subprocess.run(
        [str(Path(sys.executable).with_name("cfn-lint")), str(CLUSTER / "aws-stack.yaml")], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_iam_policy_grants_only_s3_on_one_bucket():
    policy = json.loads((CLUSTER / "iam-policy.json").read_text())
    buckets = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and not {"NotAction", "NotResource"} & st.keys()
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all(re.fullmatch(r"s3:[A-Za-z]+", a) for a in actions), actions  # S3 only, no wildcards
        for arn in st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]:
            m = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", arn)
            assert m, arn
            buckets.add(m.group(1))
    assert len(buckets) == 1
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= {a for st in policy["Statement"] for a in st["Action"]}
    # The stack grants exactly these statements, for the bucket it is given.
    (bucket,) = buckets
    stack_doc = load("aws-stack.yaml")["Resources"]["StorePolicy"]["Properties"]["PolicyDocument"]
    as_stack = json.loads(json.dumps(policy).replace(f"arn:aws:s3:::{bucket}", "arn:${AWS::Partition}:s3:::${BucketName}"))
    for st in as_stack["Statement"]:
        st["Resource"] = {"Fn::Sub": st["Resource"]}
    assert stack_doc == as_stack


def test_head_autoscaler_policy_passes_only_the_worker_role():
    head = load("aws-stack.yaml")["Resources"]["HeadRole"]["Properties"]
    (auto,) = [p["PolicyDocument"] for p in head["Policies"] if p["PolicyName"] == "ray-autoscaler"]
    for st in auto["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all(re.fullmatch(r"(ec2|ssm|iam):[A-Za-z]+", a) for a in actions), actions  # no "*" and no "ec2:*"
        if any(a.startswith("iam:") for a in actions):
            assert st["Resource"] == [{"Fn::GetAtt": ["WorkerRole", "Arn"]}, {"Fn::GetAtt": ["WorkerProfile", "Arn"]}]


# ---------------------------------------------------------------- KubeRay
def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d}


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard is never exposed outside the Kubernetes cluster
    assert head["rayStartParams"]["num-cpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
    for tpl in (head["template"], group["template"]):
        assert tpl["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dtrak-ray"  # admitted by the NetworkPolicy
        assert tpl["spec"]["serviceAccountName"] == "dtrak-ray"
        assert [p for p, s in strings(tpl) if re.search(r"(?i)secret|password|aws_access|private_key", s)] == []


def test_kuberay_raycluster_manifest():
    docs = _docs("raycluster.yaml")
    assert set(docs) == {"ServiceAccount", "RayCluster", "NetworkPolicy"}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == "dtrak-ray"
    _check_cluster_spec(rc["spec"])
    netpol = docs["NetworkPolicy"]["spec"]
    assert netpol["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "dtrak-ray"}
    assert netpol["policyTypes"] == ["Ingress"] and all("ipBlock" not in f for r in netpol["ingress"] for f in r["from"])
    assert docs["ServiceAccount"]["metadata"]["name"] == "dtrak-ray"


def test_kuberay_rayjob_manifest_runs_the_reproduction_entrypoint():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import reproduce
    finally:
        sys.path.remove(str(REPO / "jobs"))
    job = _docs("rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["submissionMode"] == "SidecarMode"  # the submitter talks to the dashboard on localhost
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "/home/ray/dtrak-ray/jobs/reproduce.py"]
    args = reproduce.parse_args(words[2:])  # the entrypoint's arguments parse
    assert (REPO / str(args.config).replace("/home/ray/dtrak-ray/", "")).is_file()
    assert args.store.startswith("s3://") and "resources.gpus_per_worker=1" in args.overrides
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) == {"env_vars"} and not [k for k in env["env_vars"] if re.search("(?i)key|secret|token|password", k)]


def test_dockerfile_matches_the_pinned_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    pins = constraints()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert f"torch=={pins['torch']}" in text and "-c /home/ray/dtrak-ray/constraints.txt" in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


# ---------------------------------------------------------------- the runtime environment of a job
def test_runtime_env_pins_agree_with_constraints_and_hold_no_secrets():
    env = load("runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "pip", "env_vars"}
    RuntimeEnv(**env)  # Ray's own parsing of a runtime env: unknown fields and bad pip options are refused
    pins = constraints()
    packages = env["pip"]["packages"]
    for spec in packages:
        name, version = spec.split("==")
        assert pins[name.lower()] == version, f"{spec} but constraints.txt pins {pins[name.lower()]}"
    names = {p.split("==")[0].lower() for p in packages}
    assert not names & {"torch", "ray"}  # the node's CUDA torch and the cluster's Ray are used as they are
    assert {"diffusers", "zarr", "s3fs"} <= names
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert not [k for k in env["env_vars"] if re.search(r"(?i)^aws_|key|secret|token|password|credential", k)]


def test_working_dir_package_is_small_and_leaves_local_state_behind(tmp_path):
    """Zip the repository exactly as `ray job submit --working-dir .` does (Ray's own packaging, which
    honours .gitignore, plus the runtime env's excludes): well under Ray's 100 MiB cap, no .venv or runs/."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _zip_files

    env = load("runtime_env.yaml")
    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), env["excludes"], str(out), include_gitignore=True)
    names = zipfile.ZipFile(out).namelist()
    assert out.stat().st_size < min(GCS_STORAGE_MAX_SIZE, 100 * 1024 * 1024) // 4
    assert "jobs/reproduce.py" in names and "dtrak_ray/pipeline.py" in names and "constraints.txt" in names
    leaked = [n for n in names if n.split("/")[0] in {".venv", "runs", ".git"} or "__pycache__" in n or ".zarr/" in n]
    assert leaked == []
