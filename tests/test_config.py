"""Config validation and the CLI's handling of bad input: clear messages, non-zero exit, no work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dtrak_ray.cli import app
from dtrak_ray.config import apply_overrides, config_diff, dump_config, load_config, parse_config
from dtrak_ray.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


def test_demo_config_loads_and_round_trips():
    cfg = load_config(DEMO)
    assert cfg.name == "demo" and cfg.features.output_functions == ("l_simple", "l_square")
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and config_diff(cfg, again) == []


def test_overrides_are_validated_like_the_file():
    cfg = load_config(DEMO, ["lds.num_subsets=8", "features.K=[10]", "name=small"])
    assert (cfg.lds.num_subsets, cfg.features.K, cfg.name) == (8, (10,), "small")
    assert config_diff(load_config(DEMO), cfg) == ["features.K", "lds.num_subsets", "name"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["lds.num_subsets"])


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("features.k=0", "features.k", "greater than 0"),
        ("lds.alpha=1.5", "lds.alpha", "less than 1"),
        ("features.K=[2000]", "features.K", "outside 1..1000"),
        ("features.output_functions=[l_cubic]", "features.output_functions", "l_square"),
        ("features.projector=fourier", "features.projector", "gaussian"),
        ("lds.num_subsets=2", "lds.num_subsets", "greater than or equal to 4"),
        ("data.classes=[3,3]", "data.classes", "two different digits"),
        ("model.attention_levels=[5]", "model: attention_levels", "outside"),
        ("features.shard_sise=4", "features.shard_sise", "unknown field"),
        ("name=bad/name", "name", "pattern"),
        ("features.projector=trak-cuda", "features.projector=trak-cuda", "gpus_per_worker"),
        ("features.timestep_strategy=log", "features.timestep_strategy", "uniform"),
    ],
)
def test_invalid_values_name_the_field(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert field in str(err.value) and hint in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_cli_refuses_invalid_config_before_any_work(tmp_path):
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["run", str(DEMO), "--store", str(store), "--set", "lds.alpha=2"])
    assert result.exit_code == 2
    assert "lds.alpha" in result.output and "Traceback" not in result.output
    assert not store.exists()  # nothing started, nothing written


def test_cli_show_config_applies_overrides():
    result = CliRunner().invoke(app, ["show-config", str(DEMO), "--set", "features.k=512"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["features"]["k"] == 512
