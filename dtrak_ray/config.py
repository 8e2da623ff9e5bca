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
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dtrak_ray.errors import ConfigError

OutputFunction = Literal["l_simple", "l_elbo", "l_square", "l_avg", "l_1", "l_2", "l_inf"]
ProjectorKind = Literal["gaussian", "rademacher", "sjlt", "trak-cuda", "none"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: str = Field("digits-2", description="Dataset name: one of dtrak_ray.datasets (digits-2, cifar10, celeba, artbench, folder).")
    classes: tuple[int | str, ...] | None = Field(
        (3, 8), description="Classes kept: digit or CIFAR label ids, ArtBench styles, folder names; null: all (celeba: null)."
    )
    n_val: int = Field(64, gt=0, description="Held-out real images (the Val test set).")
    n_train: int | None = Field(None, gt=0, description="Cap on training images (None: all left).")
    path: str | None = Field(None, description="Local folder of the dataset's files (README: Paper settings); digits-2 needs none.")
    download: bool = Field(False, description="Fetch the official archive (md5-checked) into data.path when it is missing (cifar10).")
    image_size: int | None = Field(None, gt=0, description="Resize images to this side (None: the dataset's own size).")
    center_crop: int | None = Field(None, gt=0, description="Center-crop to this side before resizing (CelebA: 140).")

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        from dtrak_ray.datasets import DATASET_NAMES

        if v not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {v!r}: choose one of {', '.join(DATASET_NAMES)}")
        return v

    @field_validator("classes")
    @classmethod
    def _distinct_digits(cls, v: tuple[int | str, ...] | None, info: Any) -> tuple[int | str, ...] | None:
        if info.data.get("dataset", "digits-2") == "digits-2":
            if v is None or len(v) != 2 or v[0] == v[1] or not all(isinstance(c, int) and 0 <= c <= 9 for c in v):
                raise ValueError("classes must be two different digits in 0..9, e.g. [3, 8]")
        elif v is not None and len(set(v)) != len(v):
            raise ValueError(f"classes {list(v)} repeat a class")
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
    kind: Literal["unet", "sd-lora"] = Field(
        "unet", description="unet: a UNet2DModel from scratch (the fields above); sd-lora: Stable Diffusion from model.pretrained + LoRA."
    )
    lora_rank: int = Field(128, gt=0, description="sd-lora: LoRA rank on attention to_q, to_k, to_v, to_out.0 (the paper: 128).")
    pretrained: str | None = Field(None, description="sd-lora: local folder of a diffusers Stable Diffusion pipeline (the paper: miniSD).")

    @model_validator(mode="after")
    def _sd_needs_weights(self) -> ModelConfig:
        if self.kind == "sd-lora" and not self.pretrained:
            raise ValueError("kind sd-lora needs model.pretrained: the local folder of a diffusers Stable Diffusion pipeline (miniSD)")
        return self

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
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast dtype of the training forward: fp16 (with a gradient scaler; the paper's, for SD + LoRA) or bf16; weights stay float32."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Checkpoint every N epochs (None: epochs // 4, so the base model keeps 4 evenly spaced checkpoints)."
    )


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
    test_block: int = Field(256, gt=0, description="Test rows scored at once (memory: test_block x max(k, N) per task).")
    top_k: int = Field(10, ge=1, description="Top-attributed training indices stored per test sample and lambda.")

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or min(v) <= 0):
            raise ValueError("lambdas must be a non-empty list of positive numbers")
        return v


BaselineMethod = Literal[
    "raw-pixels", "gradient", "tracin", "gas", "relative-if", "renormalized-if", "journey-trak", "empirical-influence", "datamodels", "clip", "all"
]


class BaselinesConfig(_Section):
    methods: tuple[BaselineMethod, ...] = Field(
        (),
        description="Baselines to run (SPEC.md section 5), any of: raw-pixels, gradient, tracin, gas, relative-if, renormalized-if, "
        "journey-trak, empirical-influence, datamodels, clip; [all] runs every one; [] (the default) none.",
    )
    K: int | None = Field(
        None, ge=1, le=1000, description="Timesteps of the gradient-based baselines, one of features.K (they reuse TRAK's features); None: the smallest."
    )
    checkpoints: int | None = Field(None, ge=1, description="TracIn/GAS: how many of the base model's stored checkpoints (evenly spaced); None: all.")
    folds: int = Field(4, ge=2, description="Empirical influence / datamodels: K-fold over LDS subsets (fit on the others, evaluate on one).")
    ridge_alphas: tuple[float, ...] = Field(
        tuple(float(f"1e{e}") for e in range(-3, 5)), min_length=1, description="Datamodels: alphas tried by RidgeCV (cross-validated)."
    )
    clip_path: str | None = Field(None, description="Local CLIP ViT-B/32 weights for the CLIP-similarity baseline; None: skipped.")

    @field_validator("methods")
    @classmethod
    def _expand_all(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        every = tuple(m for m in get_args(BaselineMethod) if m != "all")
        return every if "all" in v else tuple(dict.fromkeys(v))


class EnsembleConfig(_Section):
    sizes: tuple[int, ...] = Field((), description="Ensemble sizes S (the paper: [1, 2, 4, 8]); [] (the default) runs none.")
    output_function: OutputFunction = Field("l_square", description="Output function of the ensembled features (D-TRAK).")
    K: int | None = Field(None, ge=1, le=1000, description="Timesteps of the ensembled features (the paper: 100); None: the largest of features.K.")
    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the training set each member is trained on.")
    seed: int = Field(0, description="Seed of the members' subsets and initializations.")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 for s in v):
            raise ValueError("sizes must be positive integers, e.g. [1, 2, 4, 8]")
        return tuple(sorted(set(v)))


class CounterfactualConfig(_Section):
    n_images: int = Field(0, ge=0, description="Gen images studied (the first n of the Gen set); 0 skips the study.")
    top_k: int | None = Field(None, ge=1, description="Training samples removed per image; None: top_fraction of N.")
    top_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of the training set removed when top_k is None.")
    methods: tuple[Literal["random", OutputFunction], ...] = Field(
        ("random", "l_simple", "l_square"), min_length=1, description="random, or an output function (l_simple = TRAK, l_square = D-TRAK)."
    )
    K: int | None = Field(None, description="Feature K of the scores used; None: the largest of features.K.")
    seed: int | None = Field(None, description="Seed of the retrained models; None: the base model's seed (config seed).")


class ReportConfig(_Section):
    n_examples: int = Field(3, ge=1, description="Test images per set in the figure.")
    top: int = Field(5, ge=1, description="Top-attributed training images shown per test image.")


class ResourcesConfig(_Section):
    num_workers: int | None = Field(None, ge=1, description="Parallel workers; None: one per CPU.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1, description="torch threads inside each worker.")


class SweepConfig(_Section):
    """The Ray Tune sweep (``dtrak-ray sweep``) over k, K and f on a finished run; lambda is chosen inside each trial."""

    k: tuple[int, ...] = Field((256, 512, 2048), min_length=1, description="Projection dimensions swept.")
    K: tuple[int, ...] = Field((10, 100), min_length=1, description="Timesteps per feature swept.")
    output_functions: tuple[OutputFunction, ...] = Field(("l_simple", "l_square"), min_length=1)
    lambdas: tuple[float, ...] | None = Field(None, description="Ridge grid searched in each trial; None: scoring.lambdas or the paper's 27.")
    lambda_selection: Literal["samples", "subsets"] = Field(
        "samples", description="samples: lambda chosen on a part of the test samples; subsets: on a part of the LDS subsets."
    )
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="Fraction of the samples (or subsets) that choose lambda.")
    split_seed: int = Field(0, description="Seed of the selection / held-out split.")
    objective: Literal["val", "gen"] = Field("val", description="Test set whose held-out LDS is the objective.")

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if min(v) < 1:
            raise ValueError(f"k values {[x for x in v if x < 1]} must be positive")
        return tuple(sorted(set(v)))

    @field_validator("K")
    @classmethod
    def _sweep_k_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [k for k in v if not 1 <= k <= 1000]
        if bad:
            raise ValueError(f"K values {bad} outside 1..1000")
        return tuple(sorted(set(v)))

    @field_validator("lambdas")
    @classmethod
    def _sweep_lambdas(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or min(v) <= 0):
            raise ValueError("lambdas must be a non-empty list of positive numbers")
        return v


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
    counterfactual: CounterfactualConfig = CounterfactualConfig()
    sweep: SweepConfig = SweepConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    ensemble: EnsembleConfig = EnsembleConfig()

    @model_validator(mode="after")
    def _gpu_projector(self) -> ExperimentConfig:
        if self.features.projector == "trak-cuda" and self.resources.gpus_per_worker <= 0:
            raise ValueError(
                "features.projector=trak-cuda runs on GPUs only: set resources.gpus_per_worker=1 on a GPU cluster, "
                "or use gaussian, rademacher or sjlt"
            )
        return self

    @model_validator(mode="after")
    def _baselines(self) -> ExperimentConfig:
        b = self.baselines
        needs_trak = [m for m in b.methods if m in ("gradient", "relative-if", "renormalized-if", "journey-trak")]
        if needs_trak and b.K is not None and b.K not in self.features.K:
            raise ValueError(
                f"baselines.K={b.K}: baselines {needs_trak} reuse TRAK's features, computed at features.K {list(self.features.K)}: "
                "set baselines.K to one of those (or null for the smallest), or add it to features.K"
            )
        return self

    @model_validator(mode="after")
    def _sd_lora_scope(self) -> ExperimentConfig:
        if self.model.kind != "sd-lora":
            return self
        unsupported = [name for name, on in (("baselines.methods=[]", bool(self.baselines.methods)), ("ensemble.sizes=[]", bool(self.ensemble.sizes)),
                       ("counterfactual.n_images=0", self.counterfactual.n_images > 0)) if on]
        if unsupported:
            raise ValueError(f"model.kind=sd-lora runs train, generate, outputs, featurize, score and evaluate only: set {', '.join(unsupported)}")
        return self

    @model_validator(mode="after")
    def _data_fits_model(self) -> ExperimentConfig:
        from dtrak_ray.datasets import image_shape

        channels, side = image_shape(self.data.dataset, self.data.image_size, self.data.center_crop)
        if self.model.kind == "unet" and channels != self.model.channels:
            raise ValueError(f"model.channels={self.model.channels} but {self.data.dataset} images have {channels}: set model.channels={channels}")
        if self.model.kind == "unet" and side is not None and side != self.model.sample_size:
            raise ValueError(
                f"model.sample_size={self.model.sample_size} but {self.data.dataset} images are {side}x{side}: "
                f"set model.sample_size={side} or data.image_size={self.model.sample_size}"
            )
        return self

    @model_validator(mode="after")
    def _counterfactual(self) -> ExperimentConfig:
        c = self.counterfactual
        if c.n_images == 0:
            return self
        missing = [m for m in c.methods if m != "random" and m not in self.features.output_functions]
        if missing:
            raise ValueError(f"counterfactual.methods {missing} need scores: add them to features.output_functions, or drop them")
        if c.K is not None and c.K not in self.features.K:
            raise ValueError(f"counterfactual.K={c.K} is not in features.K {list(self.features.K)}: use one of those, or null")
        if c.n_images > self.generate.n_samples:
            raise ValueError(f"counterfactual.n_images={c.n_images} exceeds generate.n_samples={self.generate.n_samples}")
        if self.generate.eta != 0:
            raise ValueError("counterfactual regeneration needs deterministic DDIM: set generate.eta=0 (or counterfactual.n_images=0)")
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
            if err["type"] == "string_pattern_mismatch" and field == "name":
                msg = (f"{err['input']!r} does not match the run-name pattern: use letters, digits, '_', '.' and '-', "
                       "starting with a letter or digit (no '/')")
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
