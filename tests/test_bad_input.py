"""Bad input is refused by the real CLI: non-zero exit, a message naming the field or thing and the fix,
no Python traceback, and nothing already stored touched (every file of a real tiny run is hashed
before and after each case). The table grows as new cases are found.

Also the unit tests of :mod:`dtrak_ray.provenance` (refusing to combine arrays made differently).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from dtrak_ray import provenance as prov
from dtrak_ray.cli import app
from dtrak_ray.config import parse_config
from dtrak_ray.errors import ProvenanceError
from tests.conftest import TINY_MODEL, tiny_config_dict
from tests.s3server import FAKE_SECRET_KEY, clear_s3fs_cache, start_moto

RUN = "base"


def _config_dict(name: str = RUN) -> dict:
    raw = tiny_config_dict(name)
    raw["data"].update(n_train=16, n_val=4)
    raw["generate"].update(n_samples=4, ddim_steps=2)
    raw["lds"].update(num_subsets=4)
    raw["baselines"] = {"methods": []}
    raw["ensemble"] = {"sizes": []}
    return raw


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stored_run(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """A real tiny run (data, train, generate done) in a local store, and its config file."""
    from dtrak_ray.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("bad-input")
    store = root / "store"
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(_config_dict()))
    run_pipeline(parse_config(_config_dict()), str(store), stages=["data", "train", "generate"], console=Console(file=io.StringIO()))
    return store, config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


# ---- mutations of a copy of the stored run, for the cases that need a damaged store -------------------
def _save_unet(store: Path, key: str, **model: object) -> None:
    from dtrak_ray.core.models import build_unet
    from dtrak_ray.stages.common import save_model
    from dtrak_ray.storage import Store

    save_model(Store(str(store)).run(RUN), key, build_unet(0, **{**TINY_MODEL, **model}))


def _swap_checkpoint(store: Path) -> None:
    """The base model replaced by one of another width, as if copied from another run."""
    shutil.rmtree(store / RUN / "models/base/seed-0")
    _save_unet(store, "models/base/seed-0", block_out_channels=(16, 32))


def _weights_from_other_model(store: Path) -> None:
    """config.json of the run's model, weights of a wider one: a half-copied checkpoint."""
    other = store.parent / "other-store"
    _save_unet(other, "models/base/seed-0", block_out_channels=(16, 32))
    name = "diffusion_pytorch_model.safetensors"
    shutil.copy(other / RUN / "models/base/seed-0" / name, store / RUN / "models/base/seed-0" / name)
    shutil.rmtree(other)


def _truncate_chunk(store: Path) -> None:
    chunks = [p for p in (store / RUN / "data/indices.zarr/train_images/c").rglob("*") if p.is_file()]
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 3])


def _garble_zarr_json(store: Path) -> None:
    meta = store / RUN / "data/indices.zarr/train_images/zarr.json"
    meta.write_text(meta.read_text()[:-40] + "#garbled")


# ---- the table ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input: CLI arguments (``{config}`` and ``{store}`` filled in), the message fragments it must
    print (the field or thing, and the fix), and optionally a config, an environment or a damaged store."""

    args: list[str]
    expect: list[str]
    config: dict | str | None = None  # replaces the config file's content
    env: dict[str, str] = field(default_factory=dict)
    damage: Callable[[Path], None] | None = None  # applied to a copy of the stored run
    new_files_ok: bool = False  # the case may add files (never change existing ones)


def _with(path: str, value: object) -> dict:
    raw = _config_dict()
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


STAGE = ["featurize", "{config}", "--store", "{store}"]
CASES: dict[str, Case] = {
    "malformed-yaml": Case(STAGE, ["not valid YAML"], config="data: {n_val: [4\nmodel: ]\n"),
    "not-a-mapping": Case(STAGE, ["expected a mapping"], config="- just\n- a list\n"),
    "unknown-top-level-field": Case(STAGE, ["colour", "unknown field: remove it or check its spelling"], config=_with("colour", "red")),
    "unknown-nested-field": Case(STAGE, ["features.kk", "unknown field"], config=_with("features.kk", 64)),
    "k-zero": Case(STAGE + ["--set", "features.k=0"], ["features.k", "greater than 0"]),
    "k-negative": Case(STAGE + ["--set", "features.k=-8"], ["features.k", "greater than 0"]),
    "alpha-one": Case(STAGE + ["--set", "lds.alpha=1.0"], ["lds.alpha", "less than 1"]),
    "alpha-zero": Case(STAGE + ["--set", "lds.alpha=0"], ["lds.alpha", "greater than 0"]),
    "K-over-1000": Case(STAGE + ["--set", "features.K=[10, 2000]"], ["features.K", "[2000] outside 1..1000"]),
    "K-zero": Case(STAGE + ["--set", "features.K=[0]"], ["features.K", "[0] outside 1..1000"]),
    "unknown-output-function": Case(STAGE + ["--set", "features.output_functions=[l_3]"], ["features.output_functions", "'l_square'"]),
    "unknown-projector": Case(STAGE + ["--set", "features.projector=fft"], ["features.projector", "'gaussian'", "'sjlt'"]),
    "trak-cuda-without-gpus": Case(STAGE + ["--set", "features.projector=trak-cuda"], ["trak-cuda", "gpus_per_worker=1", "gaussian"]),
    "missing-config-file": Case(["featurize", "{store}/nope.yaml", "--store", "{store}"], ["nope.yaml not found", "pass the path"]),
    "set-without-equals": Case(STAGE + ["--set", "features.k"], ["--set 'features.k'", "KEY=VALUE"]),
    "set-into-non-section": Case(STAGE + ["--set", "seed.x=1"], ["seed is not a section"]),
    "run-name-with-slash": Case(STAGE + ["--set", "name=team/run"], ["name", "letters, digits"]),
    "different-config-same-run": Case(STAGE + ["--set", "train.epochs=3"], ["different config", "train.epochs", "--set name=NEW", "--overwrite"]),
    "stage-before-dependencies": Case(["score", "{config}", "--store", "{store}"], ["needs stage(s)", "featurize", "dtrak-ray run"]),
    "store-is-a-file": Case(["featurize", "{config}", "--store", "{config}"], ["cannot be reached", "check the URL"]),
    "unreachable-store": Case(
        ["featurize", "{config}", "--store", "s3://dtrak-nowhere/runs"], ["cannot be reached", "AWS_ENDPOINT_URL"],
        env={"AWS_ACCESS_KEY_ID": "AKIAUNREACHABLE0001", "AWS_SECRET_ACCESS_KEY": "unreachable-secret", "AWS_ENDPOINT_URL": "closed-port"},
    ),
    "checkpoint-of-another-architecture": Case(
        STAGE, ["models/base/seed-0", "block_out_channels: [16, 32] in the checkpoint, [8, 16] in the config", "retrain"], damage=_swap_checkpoint
    ),
    "checkpoint-weights-do-not-fit": Case(STAGE, ["models/base/seed-0", "cannot be loaded", "Retrain it"], damage=_weights_from_other_model),
    "corrupted-zarr-chunk": Case(STAGE, ["data/indices.zarr/train_images", "cannot be read", "rerun that stage"], damage=_truncate_chunk),
    "corrupted-zarr-metadata": Case(STAGE, ["data/indices.zarr/train_images", "cannot be read", "rerun that stage"], damage=_garble_zarr_json),
    "missing-dataset-path": Case(
        ["data", "{config}", "--store", "{store}", "--set", "name=cifar", "--set", "data.dataset=cifar10", "--set", "data.path={store}/no-such-dir",
         "--set", "data.classes=[1, 7]", "--set", "model.channels=3", "--set", "model.sample_size=32"],
        ["data.path=", "no-such-dir", "cifar10 needs"], new_files_ok=True,  # claim_run records the new run's config first
    ),
}


def _fill(args: list[str], config: Path, store: Path) -> list[str]:
    return [a.replace("{config}", str(config)).replace("{store}", str(store)) for a in args]


def _assert_refused(result, expect: list[str]) -> str:
    out = result.output
    assert result.exit_code != 0, out
    assert result.exception is None or isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{out}"
    assert "Traceback" not in out, out
    flat = " ".join(out.split())  # rich wraps long lines
    for frag in expect:
        assert " ".join(frag.split()) in flat, f"{frag!r} not in:\n{out}"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused(name: str, stored_run, tmp_path: Path, monkeypatch):
    case = CASES[name]
    store, config = stored_run
    if case.damage is not None:
        store = tmp_path / "store"
        shutil.copytree(stored_run[0], store)
        case.damage(store)
    if case.config is not None:
        config = tmp_path / "case.yaml"
        config.write_text(case.config if isinstance(case.config, str) else yaml.safe_dump(case.config))
    env = {k: (f"http://127.0.0.1:{_closed_port()}" if v == "closed-port" else v) for k, v in case.env.items()}
    if env:
        clear_s3fs_cache()
        monkeypatch.setenv("DTRAK_STORE_RETRY_BASE", "0.01")
    before = _hash_tree(store)
    result = CliRunner().invoke(app, _fill(case.args, config, store), env={"COLUMNS": "200", **env})
    _assert_refused(result, case.expect)
    after = _hash_tree(store)
    if case.new_files_ok:
        after = {k: v for k, v in after.items() if k in before}
    assert after == before, "the store was changed by a refused command"


def test_wrong_credentials_are_refused(stored_run, tmp_path: Path):
    """A real moto server with authentication enforced: an unknown access key is refused, clearly, and
    neither key appears in the output."""
    url, stop = start_moto(bucket="dtrak-auth", prefix="runs")
    endpoint = os.environ["AWS_ENDPOINT_URL"]

    def auth_after(count: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()

    try:
        auth_after("0")  # from now on every request must carry credentials moto's IAM knows
        wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGDTRAK000042", "AWS_SECRET_ACCESS_KEY": "wrong-secret-Hq7Zr2Lp"}
        clear_s3fs_cache()
        result = CliRunner().invoke(app, ["featurize", str(stored_run[1]), "--store", url], env={"COLUMNS": "200", **wrong})
        out = _assert_refused(result, ["s3://dtrak-auth/runs", "refused access", "AWS_ACCESS_KEY_ID", "credentials"])
        assert wrong["AWS_SECRET_ACCESS_KEY"] not in out and FAKE_SECRET_KEY not in out
    finally:
        auth_after("inf")
        stop()


@pytest.mark.parametrize("args, expect", [
    (["show-config", "{tmp}/absent.yaml"], "absent.yaml not found"),
    (["featurize", "{config}", "--store", "{tmp}/s", "--set", "lds.alpha=2"], "lds.alpha"),
    # A worker size the local Ray this command starts can never schedule (Ray would wait forever).
    (["data", "{config}", "--store", "{tmp}/s", "--set", "resources.gpus_per_worker=64"],
     "resources.gpus_per_worker=64, but the local Ray instance on this machine has"),
])
def test_bad_input_through_the_console_script(args: list[str], expect: str, stored_run, tmp_path: Path):
    """The installed entry point itself (a subprocess): exit code 2, one clear line, no traceback."""
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{config}", str(stored_run[1])) for a in args]
    proc = subprocess.run([sys.executable, "-m", "dtrak_ray.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def test_the_table_is_large_enough():
    assert len(CASES) + 1 >= 15


# ---- provenance unit tests ------------------------------------------------------------------------
FEAT = dict(output_function="l_square", K=10, timestep_strategy="uniform", timestep_seed=0, noise="per-sample", noise_seed=0,
            projector="gaussian", projector_seed=0, k=2048, model="base", model_digest="ab12", dtype="float32", dataset="digits-2")


def test_same_provenance_passes():
    prov.check_features_pair("train", FEAT, "val", dict(FEAT, split="val", digest="other"))


@pytest.mark.parametrize("field_, value", [("projector", "sjlt"), ("projector_seed", 1), ("k", 1024), ("K", 100), ("output_function", "l_simple"),
                                          ("noise_seed", 3), ("model_digest", "ff00"), ("noise", "shared"), ("dataset", "cifar10")])
def test_each_differing_field_is_named(field_: str, value: object):
    with pytest.raises(ProvenanceError) as err:
        prov.check_features_pair("features/train", FEAT, "features/val", dict(FEAT, **{field_: value}))
    msg = str(err.value)
    assert f"{field_}: {FEAT[field_]!r} (features/train) vs {value!r} (features/val)" in msg
    assert "refusing to score features/val against features/train" in msg and "--set name=NEW" in msg


def test_all_differing_fields_are_named_and_others_not():
    with pytest.raises(ProvenanceError) as err:
        prov.check_features_pair("a", FEAT, "b", dict(FEAT, k=64, projector_seed=9))
    assert "(projector_seed, k differ)" in str(err.value)
    assert "model_digest" not in str(err.value)


def test_json_round_trip_is_not_a_difference():
    # Attributes come back from JSON: tuples become lists, numpy ints become ints.
    a = dict(FEAT, K=np.int64(10), extra=(1, 2))
    b = json.loads(json.dumps(dict(FEAT, extra=[1, 2])))
    assert prov.differences({"a": a, "b": b}, [*prov.FEATURE_FIELDS, "extra"]) == []


def test_a_field_recorded_on_one_side_only():
    one_sided = {k: v for k, v in FEAT.items() if k != "noise_seed"}
    assert [f for f, _ in prov.differences({"a": FEAT, "b": one_sided}, prov.FEATURE_FIELDS)] == ["noise_seed"]
    assert prov.differences({"a": FEAT, "b": one_sided}, prov.FEATURE_FIELDS, strict=False) == []
    with pytest.raises(ProvenanceError, match="not recorded"):
        prov.check_features_pair("a", FEAT, "b", one_sided)


def test_other_featurizer_compares_the_projection_only():
    journey = dict(FEAT, noise="trajectory", noise_seed=None, model="journey", output_function="l_simple")
    prov.check_features_pair("train", FEAT, "journey", journey, same_featurizer=False)
    with pytest.raises(ProvenanceError, match="projector_seed"):
        prov.check_features_pair("train", FEAT, "journey", dict(journey, projector_seed=5), same_featurizer=False)


def test_scores_against_ground_truth():
    scores = {"test_set": "val", "dataset": "digits-2", "output_function": "l_square"}
    outputs = {"test_set": "val", "dataset": "digits-2", "output_function": "l_simple"}  # f differs by design: the truth is L_Simple
    prov.check_scores_vs_ground_truth("scores/val", scores, (27, 8, 40), "lds/outputs-val", outputs, 8, 40)
    with pytest.raises(ProvenanceError, match=r"test_set: 'gen' \(scores/val\) vs 'val' \(lds/outputs-val\)"):
        prov.check_scores_vs_ground_truth("scores/val", dict(scores, test_set="gen"), (27, 8, 40), "lds/outputs-val", outputs, 8, 40)
    with pytest.raises(ProvenanceError, match="has 8 rows but lds/outputs-val has 9"):
        prov.check_scores_vs_ground_truth("scores/val", scores, (27, 8, 40), "lds/outputs-val", outputs, 9, 40)
    with pytest.raises(ProvenanceError, match="the LDS subset masks has 41"):
        prov.check_scores_vs_ground_truth("scores/val", scores, (27, 8, 40), "lds/outputs-val", outputs, 8, 41)


def test_expected_values_and_indices_digest():
    idx = np.array([3, 1, 2])
    assert prov.indices_digest(idx) == prov.indices_digest([3, 1, 2]) != prov.indices_digest([1, 2, 3])
    prov.check_expected("features/train", FEAT, {"model_digest": "ab12"}, "score", "retrain")
    with pytest.raises(ProvenanceError, match=r"model_digest: 'ab12' \(features/train\) vs 'cd34' \(expected by this run\)"):
        prov.check_expected("features/train", FEAT, {"model_digest": "cd34"}, "score", "retrain")
