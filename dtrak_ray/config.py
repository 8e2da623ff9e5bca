"""Typed, validated experiment configuration.

An experiment is one YAML file (``jobs/configs/*.yaml``) parsed into :class:`ExperimentConfig`.
Every section is a frozen pydantic model that forbids unknown fields, so a typo is refused before
any work starts, with a message naming the field (``load_config`` turns pydantic's errors into a
:class:`~dtrak_ray.errors.ConfigError`). ``--set a.b=value`` overrides are applied to the raw YAML
mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtrak_ray.errors import ConfigError

OutputFunction = Literal["l_simple", "l_elbo", "l_square", "l_avg", "l_1", "l_2", "l_inf"]
ProjectorKind = Literal["gaussian", "rademacher", "sjlt", "trak-cuda", "none"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["digits-2"] = Field("digits-2", description="Dataset name.")
    classes: tuple[int, int] = Field((3, 8), description="The two digit classes of digits-2.")
    n_val: int = Field(64, gt=0, description="Held-out real images (the Val test set).")
    n_train: int | None = Field(None, gt=0, description="Cap on training images (None: all left).")

    @field_validator("classes")
    @classmethod
    def _distinct_digits(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] == v[1] or not all(0 <= c <= 9 for c in v):
            raise ValueError("classes must be two different digits in 0..9, e.g. [3, 8]")
        return v


class ModelConfig(_Section):
    sample_size: int = Field(8, gt=0)
    channels: int = Field(1, gt=0)
    block_out_channels: tuple[int, ...] = Field((16, 32), min_length=1)
    layers_per_block: int = Field(1, gt=0)
    attention_levels: tuple[int, ...] = Field((), description="Levels (0-based) with self-attention.")
    norm_num_groups: int = Field(8, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "scale_shift"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        n = len(self.block_out_channels)
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < n]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{n - 1} (one per block_out_channels)")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"block_out_channels {odd} not divisible by norm_num_groups={self.norm_num_groups}")
        return self


class DiffusionConfig(_Section):
    num_train_timesteps: int = Field(1000, gt=0)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)


class TrainConfig(_Section):
    epochs: int = Field(100, gt=0, description="Epochs; subset models use the same epochs on less data.")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = Field(1e-6, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    random_flip: bool = Field(False, description="Random horizontal flips (off for digits).")


class GenerateConfig(_Section):
    n_samples: int = Field(64, gt=0, description="Images generated from the base model (the Gen set).")
    ddim_steps: int = Field(50, gt=0, le=1000)
    eta: float = Field(0.0, ge=0)
    seed: int = 0


class LDSConfig(_Section):
    num_subsets: int = Field(24, ge=4, description="M, the number of random training subsets.")
    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the training set in each subset.")
    seeds: int = Field(1, ge=1, description="Training seeds per subset model.")
    output_timesteps: int = Field(50, ge=1, le=1000, description="Uniform timestep grid of the ground truth.")
    noise_seeds: int = Field(1, ge=1, description="Noise draws per (sample, timestep) of the ground truth.")
    bootstrap_resamples: int = Field(64, ge=2)


class FeaturesConfig(_Section):
    output_functions: tuple[OutputFunction, ...] = Field(("l_simple", "l_square"), min_length=1)
    K: tuple[int, ...] = Field((10, 100), min_length=1, description="Timesteps per feature.")
    timestep_strategy: Literal["uniform", "cumulative", "random"] = Field(
        "uniform", description="uniform: range(0, T, T // K) (the paper); cumulative: the first K; random: K seeded draws."
    )
    timestep_seed: int = Field(0, description="Seed of the random timestep strategy.")
    noise: Literal["per-sample", "shared"] = Field(
        "per-sample", description="per-sample: noise keyed by (seed, t, index); shared: by (seed, t)."
    )
    noise_seed: int = 0
    projector: ProjectorKind = "gaussian"
    k: int = Field(2048, gt=0, description="Projection dimension.")
    projector_seed: int = 0
    micro_batch: int = Field(32, gt=0, description="Samples whose full gradients are held at once.")
    shard_size: int = Field(128, gt=0, description="Rows per shard (= Zarr chunk).")
    dtype: Literal["float32", "float16"] = "float32"
    parameters: tuple[str, ...] | None = Field(
        None, min_length=1, description="fnmatch patterns of the parameters to differentiate (LoRA: ['*lora_*']); None: all."
    )

    @field_validator("K")
    @classmethod
    def _k_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [k for k in v if not 1 <= k <= 1000]
        if bad:
            raise ValueError(f"K values {bad} outside 1..1000")
        return tuple(sorted(set(v)))


class ScoringConfig(_Section):
    lambdas: tuple[float, ...] | None = Field(None, description="Ridge grid; None: the paper's 27 values.")
    heldout_seed: int = 0

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or min(v) <= 0):
            raise ValueError("lambdas must be a non-empty list of positive numbers")
        return v


class ReportConfig(_Section):
    n_examples: int = Field(3, ge=1, description="Test images per set in the figure.")
    top: int = Field(5, ge=1, description="Top-attributed training images shown per test image.")


class ResourcesConfig(_Section):
    num_workers: int | None = Field(None, ge=1, description="Parallel workers; None: one per CPU.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1, description="torch threads inside each worker.")


class ExperimentConfig(_Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name in the store.")
    seed: int = 42
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    lds: LDSConfig = LDSConfig()
    features: FeaturesConfig = FeaturesConfig()
    scoring: ScoringConfig = ScoringConfig()
    report: ReportConfig = ReportConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _gpu_projector(self) -> ExperimentConfig:
        if self.features.projector == "trak-cuda" and self.resources.gpus_per_worker <= 0:
            raise ValueError(
                "features.projector=trak-cuda runs on GPUs only: set resources.gpus_per_worker=1 on a GPU cluster, "
                "or use gaussian, rademacher or sjlt"
            )
        return self

    def section_digest(self, *sections: str) -> str:
        """A short digest of the named sections (dotted names allowed), for stage markers."""
        blob = {s: _dig(self.model_dump(mode="json"), s) for s in sorted(sections)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _dig(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lds.num_subsets=8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return out


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a mapping; pydantic's errors become one ConfigError naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field: remove it or check its spelling"
            lines.append(f"  {field}: {msg}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass the path of a YAML config, e.g. jobs/configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(apply_overrides(raw, overrides or []), source=str(path))


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of a config, every field explicit, so a stored run says exactly what made it."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Dotted names of the fields whose values differ between two configs."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for k, v in tree.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: tree}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
