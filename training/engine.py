"""The training loop: baseline, DenoiseRep fine-tuning and label-free DenoiseRep, on CPU, GPU or DDP.

Stages (``train.stage``):

* ``baseline``: the bag-of-tricks recipe (PK batches, label-smoothed CE on the BNNeck output,
  batch-hard triplet on the pooled feature) from random or pretrained weights, or continuing from
  ``train.init``.
* ``denoiserep``: starts from a trained checkpoint (``train.init``), converts the backbone with
  :func:`training.denoiserep.convert` and alternates two phases, as in the paper: a **denoiser
  phase** (only D and d train, on the label-free denoising loss alone; the backbone runs under
  ``no_grad``, no label is read, only the denoisers' own Adam optimiser steps) and a **backbone
  phase** (the task loss through the fused weights; the denoisers are frozen). ``mode: joint``
  trains both at once, still with the denoisers fed only by their own loss (the fused weights use a
  detached D). A phase switch only flips ``requires_grad``; frozen BatchNorm layers run in eval
  mode so a frozen phase does not move their running statistics either.
* ``label-free``: the denoiser phase alone (DenoiseRep's label-free adaptation to an unlabelled
  camera network). ``reid calibrate`` reaches the optimum that phase converges to in one pass.

Each epoch's record carries the fused weight change ``||W' - W|| / ||W||`` (mean and max over the
converted layers), so an empty DenoiseRep is visible in the log.

Evaluation runs every ``eval.every`` epochs on the *fused* model (what the export will contain),
on rank 0. After every epoch ``last.pt`` is written atomically (``best.pt`` when mAP improved), so
a run resumes exactly: model, optimiser, LR schedule, AMP scaler, every RNG, epoch and phase.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from training.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    CheckpointError,
    capture_rng_state,
    check_architecture,
    convert_backbone,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from training.config import Config, config_to_dict, dump_config
from training.data.dataset import ReIDDataset
from training.data.image_dataset import TrainImageDataset, relabel
from training.data.pk_sampler import PKBatchSampler
from training.data.transforms import (
    Augmentation,
    Preprocess,
    build_test_transform,
    build_train_transform,
    preprocess_for_backbone,
)
from training.distributed import DistInfo, barrier, init_distributed
from training.embedding import evaluate_embedder
from training.export import fused_model
from training.losses import ReIDLoss
from training.model import ReIDModel, create_reid_model, ensure_known_backbone
from training.tensorboard_log import TensorBoardSink

__all__ = [
    "DEFAULT_SIZES",
    "LRSchedule",
    "RunResult",
    "Trainer",
    "TrainingError",
    "phase_for_epoch",
    "train",
]

log = logging.getLogger(__name__)

DEFAULT_SIZES: dict[str, tuple[int, int]] = {"person": (256, 128), "vehicle": (256, 256)}
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says what to change."""


# ----------------------------------------------------------------------------- schedule and phases


class LRSchedule:
    """Warmup then cosine or multistep, evaluated at a fractional epoch ``t`` every iteration.

    Each param group keeps its own base LR in ``group["base_lr"]`` (saved with the optimiser), so the
    denoiser group can run at its own rate under the same shape of schedule.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_epochs: float,
        kind: str = "cosine",
        warmup_epochs: float = 0.0,
        warmup_factor: float = 0.01,
        min_lr_ratio: float = 0.01,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        if kind not in ("cosine", "multistep"):
            raise ValueError(f"unknown LR schedule {kind!r}: use cosine or multistep")
        self.optimizer = optimizer
        self.total_epochs = float(total_epochs)
        self.kind = kind
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_factor = warmup_factor
        self.min_lr_ratio = min_lr_ratio
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.t = 0.0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def factor(self, t: float) -> float:
        """The LR multiplier at fractional epoch ``t``."""
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            alpha = t / self.warmup_epochs
            return self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        if self.kind == "multistep":
            return self.gamma ** sum(t >= m for m in self.milestones)
        span = max(self.total_epochs - self.warmup_epochs, 1e-8)
        progress = min(max((t - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, t: float) -> None:
        self.t = t
        f = self.factor(t)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step(float(state["t"]))


def phase_for_epoch(config: Config, epoch: int) -> str | None:
    """The DenoiseRep phase of a 0-based epoch: None for baseline, else denoiser/backbone/joint."""
    stage, dr = config.train.stage, config.denoiserep
    if stage == "baseline":
        return None
    if stage == "label-free":
        return "denoiser"
    if dr.mode == "joint":
        return "joint"
    other = "backbone" if dr.first_phase == "denoiser" else "denoiser"
    lengths = {"denoiser": dr.denoiser_epochs, "backbone": dr.backbone_epochs}
    cycle = [dr.first_phase] * lengths[dr.first_phase] + [other] * lengths[other]
    return cycle[epoch % len(cycle)]


# ----------------------------------------------------------------------------- model construction


def _param_groups(model: ReIDModel, lr: float, weight_decay: float) -> list[dict]:
    """Decay / no-decay (biases, norms) groups of the backbone and head, without the denoisers.

    The denoisers have their own optimiser (:func:`_denoiser_optimizer`): weight decay on D, at
    the task's learning rate, keeps it at a few percent of its optimum (DESIGN.md section 4).
    """
    from training import denoiserep

    denoisers = (
        {id(p) for p in denoiserep.denoiser_parameters(model.backbone)}
        if denoiserep.is_converted(model.backbone)
        else set()
    )
    groups: dict[bool, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name == "bnneck.bias" or id(param) in denoisers:  # bnneck.bias: frozen at zero (bag of tricks)
            continue
        groups.setdefault(param.ndim <= 1, []).append(param)
    return [
        {
            "params": params,
            "lr": lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": "backbone" + ("_no_decay" if no_decay else ""),
        }
        for no_decay, params in sorted(groups.items())
    ]


def _denoiser_optimizer(model: ReIDModel, lr: float) -> torch.optim.Optimizer | None:
    """Adam without weight decay over the denoisers (D, d); None for an unconverted model."""
    from training import denoiserep

    if not denoiserep.is_converted(model.backbone):
        return None
    return torch.optim.Adam(denoiserep.denoiser_parameters(model.backbone), lr=lr)


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across the processes (what DDP would do)."""
    import torch.distributed as dist

    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen run in eval mode (running stats unchanged)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


# ----------------------------------------------------------------------------- the trainer


@dataclass
class RunResult:
    """What a finished (or already complete) run produced."""

    run_dir: Path
    stage: str
    epochs: int
    best: dict[str, Any] | None
    last_evaluation: dict[str, Any] | None
    skipped_images: int
    history: list[dict[str, Any]] = field(default_factory=list)


EpochCallback = Callable[[int, dict[str, Any]], None]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Runs one stage of training into a run directory.

    Args:
        config: the validated configuration.
        run_dir: where checkpoints, metrics and the summary go.
        dataset: an already parsed dataset (default: built from ``config.data``).
        callbacks: called on every rank after each epoch's checkpoint with ``(epoch, record)``
            (progress reporting; tests use it to interrupt a run).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        *,
        dataset: ReIDDataset | None = None,
        callbacks: Sequence[EpochCallback] = (),
    ) -> None:
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self._dataset = dataset
        self.dist: DistInfo = DistInfo()
        self.history: list[dict[str, Any]] = []
        self._best_improved = False

    # -- setup ---------------------------------------------------------------------------------

    def _load_dataset(self) -> ReIDDataset:
        if self._dataset is not None:
            return self._dataset
        from training.data.registry import build_dataset

        data = self.cfg.data
        if not data.dataset or not data.root:
            raise TrainingError(
                "no dataset given: pass --dataset NAME --root DIR (or data.dataset/data.root)"
            )
        return build_dataset(data.dataset, data.root, **data.options)

    def _init_checkpoint(self) -> dict[str, Any] | None:
        init = self.cfg.train.init
        if self.cfg.train.stage != "baseline" and not init:
            raise TrainingError(
                f"stage {self.cfg.train.stage!r} starts from a trained model: pass --init "
                "RUN_DIR_OR_CHECKPOINT (e.g. the baseline's run directory)"
            )
        if not init:
            return None
        ckpt = load_checkpoint(init)
        check_architecture(ckpt, self.cfg.model.backbone, self.cfg.model.kwargs)
        return ckpt

    def _build_model(self, init: dict[str, Any] | None, label_map: list[int], kind: str) -> ReIDModel:
        cfg = self.cfg
        num_classes = len(label_map) if cfg.train.stage != "label-free" else 0
        if init is None:
            size = tuple(cfg.data.size) if cfg.data.size else DEFAULT_SIZES[kind]
            model = create_reid_model(
                cfg.model.backbone,
                num_classes=num_classes,
                img_size=size,  # type: ignore[arg-type]
                embedding=cfg.model.embedding,
                backbone_kwargs=cfg.model.kwargs,
                pretrained=cfg.model.pretrained,
            )
            self.preprocess = preprocess_for_backbone(
                model.backbone.pretrained_cfg, size, cfg.data.interpolation
            )
            return model
        model = model_from_checkpoint(init)
        self.preprocess = Preprocess.from_dict(init["preprocess"])
        if cfg.data.size and tuple(cfg.data.size) != self.preprocess.size:
            log.warning(
                "data.size %s differs from the size the init checkpoint was trained with %s; keeping %s",
                list(cfg.data.size),
                list(self.preprocess.size),
                list(self.preprocess.size),
            )
        if cfg.train.stage == "label-free":
            return model
        if list(init.get("label_map") or []) != label_map:
            # Another training set (or none recorded): the old classifier's classes mean nothing here.
            log.info("training identities differ from the init checkpoint's: new ID classifier")
            classifier = nn.Linear(model.embed_dim, len(label_map), bias=False)
            nn.init.normal_(classifier.weight, std=0.001)
            model.classifier, model.num_classes = classifier, len(label_map)
        return model

    def _prepare_denoiserep(self, model: ReIDModel, init: dict[str, Any] | None) -> dict[str, Any] | None:
        """Converts the backbone for the DenoiseRep stages; returns the convert settings."""
        if self.cfg.train.stage == "baseline":
            if init and init.get("denoiserep"):
                raise TrainingError(
                    "the init checkpoint is a DenoiseRep model; continue it with --stage denoiserep or "
                    "label-free, or start the baseline from a baseline checkpoint"
                )
            return None
        if init and init.get("denoiserep"):
            return dict(init["denoiserep"])  # model_from_checkpoint already converted it
        dr = self.cfg.denoiserep
        settings = {
            "layers": dr.layers,
            "schedule": dr.schedule,
            "timesteps": dr.timesteps,
            "beta": list(dr.beta),
            "conv_side": dr.conv_side,
        }
        convert_backbone(model.backbone, settings)
        return settings

    # -- the run -------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Trains the configured stage to the end (resuming from ``last.pt`` when present)."""
        cfg = self.cfg
        self.dist = init_distributed(cfg.train.device)
        device = self.dist.device
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        _seed_everything(cfg.train.seed)
        # Cheap checks first: a wrong name or checkpoint should fail before a large dataset is parsed.
        ensure_known_backbone(cfg.model.backbone)
        resume_path = self.run_dir / LAST_NAME
        resume = load_checkpoint(resume_path) if cfg.train.resume and resume_path.is_file() else None
        if resume is not None and resume.get("stage") != cfg.train.stage:
            raise TrainingError(
                f"{self.run_dir} holds a {resume.get('stage')!r} run; write the {cfg.train.stage!r} stage "
                "to another --out directory"
            )
        if resume is not None:
            check_architecture(resume, cfg.model.backbone, cfg.model.kwargs)
        init = self._init_checkpoint()

        dataset = self._load_dataset()
        if not dataset.train:
            raise TrainingError(f"dataset {dataset.name} at {dataset.root} has no training images")
        self.dataset = dataset
        label_map_dict = relabel(dataset.train)
        label_map = sorted(label_map_dict)
        model = self._build_model(init, label_map, dataset.kind)
        dr_settings = self._prepare_denoiserep(model, init)
        if dr_settings is not None:
            from training import denoiserep

            denoiserep.set_loss_rows(model.backbone, cfg.denoiserep.loss_rows)
            denoiserep.set_fused_refresh(model.backbone, cfg.denoiserep.fused_refresh)
        if resume is not None:
            # The run's own checkpoint wins over init: same architecture, later weights.
            if resume.get("denoiserep") != dr_settings:
                raise TrainingError(
                    f"{resume_path} was written with other DenoiseRep settings; use a new --out"
                )
            try:
                model.load_state_dict(resume["model"], strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{resume_path} does not fit the configured model: {exc}") from exc
        model.to(device)
        self.channels_last = device.type == "cuda" and cfg.train.channels_last and model.is_cnn
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.dr_settings, self.label_map = model, dr_settings, label_map
        self.kind = dataset.kind

        stage_epochs = cfg.stage_epochs()
        train_ds = TrainImageDataset(
            dataset.train,
            build_train_transform(
                self.preprocess,
                Augmentation(
                    flip_prob=cfg.data.flip_prob, pad=cfg.data.pad, erasing_prob=cfg.data.erasing_prob
                ),
            ),
            label_map_dict,
        )
        self.train_ds = train_ds
        sampler = self._batch_sampler(train_ds)
        steps = len(sampler)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        if steps == 0:
            raise TrainingError(
                f"the training set yields no full batch of {cfg.data.p}x{cfg.data.k} images per process; "
                "lower data.p / data.k"
            )
        self.steps_per_epoch = steps

        lr = cfg.optim.lr if cfg.train.stage == "baseline" or cfg.denoiserep.lr is None else cfg.denoiserep.lr
        optimizer = self._optimizer(_param_groups(model, lr, cfg.optim.weight_decay))
        denoiser_optimizer = _denoiser_optimizer(model, cfg.denoiserep.denoiser_lr)
        warmup = cfg.optim.warmup_epochs if cfg.train.stage == "baseline" else cfg.denoiserep.warmup_epochs
        schedule = LRSchedule(
            optimizer,
            total_epochs=stage_epochs,
            kind=cfg.optim.schedule,
            warmup_epochs=warmup,
            warmup_factor=cfg.optim.warmup_factor,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            milestones=cfg.optim.milestones,
            gamma=cfg.optim.gamma,
        )
        self.amp_dtype = self._amp_dtype(device)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = ReIDLoss(
            id_weight=cfg.loss.id_weight,
            triplet_weight=cfg.loss.triplet_weight,
            label_smoothing=cfg.loss.label_smoothing,
            triplet_margin=None if cfg.loss.soft_margin else cfg.loss.triplet_margin,
            normalize_feature=cfg.loss.normalize_feature,
        )

        start_epoch, global_step = 0, 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.skipped: set[str] = set()
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            if denoiser_optimizer is not None:
                if not resume.get("denoiser_optimizer"):
                    raise TrainingError(
                        f"{resume_path} was written by an older version without the denoiser optimiser; "
                        "start the stage again in a new --out directory"
                    )
                denoiser_optimizer.load_state_dict(resume["denoiser_optimizer"])
            schedule.load_state_dict(resume["scheduler"])
            if resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            start_epoch, global_step = int(resume["epoch"]), int(resume["global_step"])
            self.best, self.last_eval = resume.get("best"), resume.get("last_evaluation")
            self.skipped = set(resume.get("skipped_paths") or [])
            self.history = list(resume.get("history") or [])
            self._restore_rng(resume)
            log.info(
                "resuming %s at epoch %d/%d from %s", cfg.train.stage, start_epoch, stage_epochs, resume_path
            )
        self.optimizer, self.schedule, self.scaler = optimizer, schedule, scaler
        self.denoiser_optimizer = denoiser_optimizer

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / CONFIG_NAME)
        self._tb = TensorBoardSink(self.run_dir) if self.dist.is_main and cfg.train.tensorboard else None
        log.info(
            "stage %s: %s on %s (%s), %d identities, %d images, %d steps/epoch of %d, %d epochs",
            cfg.train.stage,
            model.arch,
            dataset.name,
            device,
            len(label_map),
            len(dataset.train),
            steps,
            sampler.batch_size if hasattr(sampler, "batch_size") else cfg.data.p * cfg.data.k,
            stage_epochs,
        )

        ddp_model: nn.Module = model
        current_phase: str | None = "<unset>"
        try:
            for epoch in range(start_epoch, stage_epochs):
                phase = phase_for_epoch(cfg, epoch)
                if phase != current_phase:
                    self._apply_phase(phase)
                    ddp_model = self._wrap(model)
                    current_phase = phase
                record = self._train_epoch(ddp_model, sampler, epoch, phase, global_step)
                global_step += record.pop("_steps")
                if self._eval_due(epoch, stage_epochs):
                    record["evaluation"] = self._evaluate(epoch)
                self.history.append(record)
                if self.dist.is_main:
                    self._log_record(record)
                self._save(epoch + 1, global_step, phase)
                for callback in self.callbacks:
                    callback(epoch, record)
        finally:
            if self._tb is not None:
                self._tb.close()
            if self.dr_settings is not None:
                from training import denoiserep

                denoiserep.unfold(model.backbone)  # the caller gets the layers' own (W, b) back
        result = RunResult(
            run_dir=self.run_dir,
            stage=cfg.train.stage,
            epochs=stage_epochs,
            best=self.best,
            last_evaluation=self.last_eval,
            skipped_images=len(self.skipped),
            history=self.history,
        )
        if self.dist.is_main:
            self._write_summary(result)
        barrier()
        return result

    # -- pieces of the loop --------------------------------------------------------------------

    def _batch_sampler(self, train_ds: TrainImageDataset) -> PKBatchSampler | BatchSampler:
        cfg = self.cfg
        if cfg.train.stage == "label-free":
            # No labels: plain shuffled batches (a PK sampler would read the identities).
            base = DistributedSampler(
                train_ds,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                seed=cfg.train.seed,
                drop_last=True,
            )
            return BatchSampler(base, batch_size=cfg.data.p * cfg.data.k, drop_last=True)
        try:
            return PKBatchSampler(
                train_ds.pids,
                cfg.data.p,
                cfg.data.k,
                seed=cfg.train.seed,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
            )
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)

    def _amp_dtype(self, device: torch.device) -> torch.dtype | None:
        mode = self.cfg.train.amp
        if device.type != "cuda" or mode == "off":
            return None
        if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _apply_phase(self, phase: str | None) -> None:
        """Flips requires_grad for a DenoiseRep phase; the head trains unless only denoisers do."""
        if phase is None:
            return
        from training import denoiserep

        denoiserep.set_phase(self.model.backbone, phase)  # unfolds for a phase that trains D
        if phase == "backbone" and self.cfg.denoiserep.fold_backbone:
            denoiserep.fold(self.model.backbone)
        head_trains = phase != "denoiser"
        self.model.bnneck.weight.requires_grad_(head_trains)
        if self.model.classifier is not None:
            self.model.classifier.weight.requires_grad_(head_trains and self.cfg.train.stage != "label-free")
        log.info("phase %s", phase)

    def _wrap(self, model: ReIDModel) -> nn.Module:
        if not self.dist.enabled:
            return model
        # Rebuilt at each phase switch: DDP registers the parameters that require grad when it is built.
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _loader(self, sampler: Any, epoch: int) -> DataLoader:
        cfg = self.cfg
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        elif hasattr(sampler, "sampler") and hasattr(sampler.sampler, "set_epoch"):
            sampler.sampler.set_epoch(epoch)
        # The worker seeds (augmentation) derive from this generator: a function of (seed, epoch, rank).
        gen = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)
        return DataLoader(
            self.train_ds,
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=self.dist.device.type == "cuda",
            generator=gen,
            persistent_workers=False,
        )

    def _train_epoch(
        self, model: nn.Module, sampler: Any, epoch: int, phase: str | None, global_step: int
    ) -> dict[str, Any]:
        cfg = self.cfg
        inner = self.model
        inner.train()
        _freeze_frozen_batchnorm(inner)
        device = self.dist.device
        label_free = cfg.train.stage == "label-free"
        denoising = self.dr_settings is not None and cfg.train.stage != "baseline"
        from training import denoiserep

        sums = {"loss": 0.0, "id_loss": 0.0, "triplet_loss": 0.0, "denoise_loss": 0.0, "accuracy": 0.0}
        images, steps = 0, 0
        start = time.perf_counter()
        loader = self._loader(sampler, epoch)
        steps_this_epoch = len(sampler)  # after set_epoch: PK epochs differ slightly in length
        if cfg.train.max_steps_per_epoch:
            steps_this_epoch = min(steps_this_epoch, cfg.train.max_steps_per_epoch)
        stage_epochs = cfg.stage_epochs()
        bar = tqdm(
            total=steps_this_epoch,
            desc=f"{cfg.train.stage} {epoch + 1}/{stage_epochs}" + (f" [{phase}]" if phase else ""),
            unit="step",
            disable=None if self.dist.is_main else True,
            leave=False,
        )
        # A denoiser phase (and the label-free stage) trains only D and d, on their own loss: the
        # backbone runs under no_grad, no label is read, only the denoiser optimiser steps.
        denoiser_only = label_free or phase == "denoiser"
        optimizers = [] if denoiser_only else [self.optimizer]
        if phase in ("denoiser", "joint"):
            optimizers.append(self.denoiser_optimizer)
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        for step, batch in enumerate(_take(loader, steps_this_epoch)):
            self.schedule.step(epoch + step / steps_this_epoch)
            x = batch["image"].to(device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.skipped.update(p for p in batch["skipped"] if p)
            task = None
            with self._autocast():
                if denoiser_only:
                    # The unwrapped model: DDP would prepare a backward that never comes (the
                    # gradients are averaged by hand below).
                    with torch.no_grad():
                        inner(x)
                    loss = denoiserep.denoise_loss(inner.backbone)
                    d_loss = loss.detach()
                else:
                    logits, feat, _ = model(x)
                    labels = batch["label"].to(device, non_blocking=True)
                    task = self.loss_fn(logits, feat, labels)
                    loss = task.total
                    d_loss = torch.zeros(())
                    if denoising:
                        d = denoiserep.denoise_loss(inner.backbone)
                        d_loss = d.detach()
                        loss = loss + cfg.loss.denoise_weight * d
            if not loss.requires_grad:
                raise TrainingError(f"nothing to train in phase {phase!r}: the loss has no gradient")
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at epoch {epoch + 1} step {step + 1}; lower optim.lr or "
                    "enable optim.grad_clip"
                )
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if denoiser_only and self.dist.enabled:
                _average_gradients(params, self.dist.world_size)
            if cfg.optim.grad_clip:
                for opt in optimizers:
                    self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.optim.grad_clip)
            for opt in optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            n = x.shape[0]
            images += n
            steps += 1
            sums["loss"] += loss_value
            sums["denoise_loss"] += float(d_loss)
            if task is not None:
                sums["id_loss"] += float(task.id_loss)
                sums["triplet_loss"] += float(task.triplet_loss)
                sums["accuracy"] += float(task.accuracy)
            bar.update(1)
            if self.dist.is_main and bar.disable is False:
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{sums['loss'] / steps:.3f}",
                    acc=f"{sums['accuracy'] / steps:.3f}",
                    img_s=f"{images / max(elapsed, 1e-9):.0f}",
                )
        bar.close()
        seconds = time.perf_counter() - start
        means = {k: v / max(steps, 1) for k, v in sums.items()}
        means, images_total = self._reduce(means, images)
        self._gather_skipped()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "stage": cfg.train.stage,
            "phase": phase,
            **{k: round(v, 6) for k, v in means.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "images": images_total,
            "images_per_s": round(images_total / max(seconds, 1e-9), 2),
            "seconds": round(seconds, 3),
            "skipped_images": len(self.skipped),
            "_steps": steps,
        }
        if denoiser_only:
            # No label was read: there is no task loss or accuracy to report for this epoch.
            for key in ("id_loss", "triplet_loss", "accuracy"):
                record.pop(key)
        if denoising:
            changes = denoiserep.weight_changes(inner.backbone)
            summary = denoiserep.summarize_changes(changes)
            record["weight_change_mean"] = summary["mean"]
            record["weight_change_max"] = summary["max"]
        return record

    def _reduce(self, means: dict[str, float], images: int) -> tuple[dict[str, float], int]:
        if not self.dist.enabled:
            return means, images
        import torch.distributed as dist

        keys = sorted(means)
        t = torch.tensor(
            [means[k] for k in keys] + [float(images)], dtype=torch.float64, device=self.dist.device
        )
        dist.all_reduce(t)
        values = t.tolist()
        return {k: v / self.dist.world_size for k, v in zip(keys, values, strict=False)}, int(values[-1])

    def _gather_skipped(self) -> None:
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, sorted(self.skipped))
        for paths in gathered:
            self.skipped.update(paths or [])

    def _eval_due(self, epoch: int, stage_epochs: int) -> bool:
        every = self.cfg.eval.every
        if every < 0 or not self.dataset.gallery:
            return False
        last = epoch + 1 == stage_epochs
        return last or (every > 0 and (epoch + 1) % every == 0)

    def _evaluate(self, epoch: int) -> dict[str, Any] | None:
        """Evaluates the fused model on rank 0 and broadcasts nothing (others wait at the barrier)."""
        result: dict[str, Any] | None = None
        if self.dist.is_main:
            result = self.evaluate_fused()
            self.last_eval = {**result, "epoch": epoch + 1}
            if self.best is None or result["mAP"] > self.best["mAP"]:
                self.best = {"epoch": epoch + 1, "mAP": result["mAP"], "evaluation": result}
                self._best_improved = True
            log.info(
                "epoch %d: mAP %.4f rank-1 %.4f (%s)",
                epoch + 1,
                result["mAP"],
                result["cmc"]["1"],
                result["protocol"],
            )
        barrier()
        return _compact(result) if result else None

    def evaluate_fused(self) -> dict[str, Any]:
        """The evaluation protocol on the fused copy of the current model (what an export contains)."""
        cfg = self.cfg
        plain = fused_model(self.model).to(self.dist.device)
        if self.amp_dtype is not None:
            plain = plain.to(self.amp_dtype)
        if self.channels_last:
            plain = plain.to(memory_format=torch.channels_last)

        def embed(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = batch.to(self.dist.device, dtype=self.amp_dtype or torch.float32)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                return F.normalize(plain.embed(x).float(), dim=1)

        return evaluate_embedder(
            embed,
            self.dataset,
            build_test_transform(self.preprocess),
            protocol=cfg.eval.protocol,
            metric=cfg.eval.metric,
            rerank=cfg.eval.rerank,
            test_size=cfg.eval.test_size,
            trials=cfg.eval.trials,
            seed=cfg.train.seed,
            batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
            device=self.dist.device,
        )

    def _restore_rng(self, resume: Mapping[str, Any]) -> None:
        states = resume.get("rng_per_rank") or []
        if len(states) == self.dist.world_size:
            restore_rng_state(states[self.dist.rank])
        else:
            log.warning(
                "checkpoint has RNG states of %d processes, this run has %d: reseeding instead of restoring",
                len(states),
                self.dist.world_size,
            )
            _seed_everything(self.cfg.train.seed * 7919 + int(resume["epoch"]) + self.dist.rank)

    def _save(self, epochs_done: int, global_step: int, phase: str | None) -> None:
        rng = capture_rng_state()
        if self.dist.enabled:
            import torch.distributed as dist

            states: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.dist.is_main:
            payload = self.checkpoint_payload(epochs_done, global_step, phase, states)
            save_checkpoint(self.run_dir / LAST_NAME, payload)
            if getattr(self, "_best_improved", False):
                save_checkpoint(self.run_dir / BEST_NAME, payload)
        self._best_improved = False
        barrier()

    def checkpoint_payload(
        self, epochs_done: int, global_step: int, phase: str | None, rng_states: list[Any]
    ) -> dict[str, Any]:
        """Everything a resume or an export needs, as weights_only-loadable data."""
        model = self.model
        return {
            "stage": self.cfg.train.stage,
            "epoch": epochs_done,
            "global_step": global_step,
            "phase": phase,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "architecture": {
                **model.architecture(),
                "embedding": model.embedding,
                "num_classes": model.num_classes,
            },
            "denoiserep": self.dr_settings,
            "optimizer": self.optimizer.state_dict(),
            "denoiser_optimizer": (
                self.denoiser_optimizer.state_dict() if self.denoiser_optimizer is not None else None
            ),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng_per_rank": rng_states,
            "world_size": self.dist.world_size,
            "config": config_to_dict(self.cfg),
            "label_map": self.label_map,
            "kind": self.kind,
            "dataset": self.dataset.name,
            "preprocess": self.preprocess.to_dict(),
            "best": self.best,
            "last_evaluation": self.last_eval,
            "skipped_paths": sorted(self.skipped),
            "history": self.history,
            "training": self.training_summary(epochs_done),
        }

    def training_summary(self, epochs_done: int) -> dict[str, Any]:
        """The recipe summary that ``model.json`` records."""
        cfg, ds = self.cfg, self.dataset
        return {
            "stage": cfg.train.stage,
            "dataset": ds.name,
            "kind": ds.kind,
            "train_identities": len(self.label_map),
            "train_images": len(ds.train),
            "skipped_images": len(self.skipped),
            "epochs": epochs_done,
            "seed": cfg.train.seed,
            "sampler": {"p": cfg.data.p, "k": cfg.data.k, "world_size": self.dist.world_size},
            "loss": config_to_dict(self.cfg)["loss"],
            "optimizer": {
                "name": cfg.optim.name,
                "lr": self.optimizer.param_groups[0]["base_lr"],
                "schedule": cfg.optim.schedule,
                "weight_decay": cfg.optim.weight_decay,
            },
            "denoiserep_mode": None if cfg.train.stage == "baseline" else cfg.denoiserep.mode,
            "init": cfg.train.init,
            "pretrained": cfg.model.pretrained,
        }

    def _log_record(self, record: Mapping[str, Any]) -> None:
        with open(self.run_dir / METRICS_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        parts = [
            f"{k}={record[k]}" for k in ("loss", "denoise_loss", "accuracy", "images_per_s") if k in record
        ]
        log.info("epoch %d (%s): %s", record["epoch"], record["phase"] or "baseline", " ".join(parts))
        if self._tb is not None:
            self._tb.write(record)

    def _write_summary(self, result: RunResult) -> None:
        summary = {
            "stage": result.stage,
            "epochs": result.epochs,
            "best": _compact(result.best["evaluation"]) | {"epoch": result.best["epoch"]}
            if result.best
            else None,
            "last_evaluation": _compact(result.last_evaluation) if result.last_evaluation else None,
            "skipped_images": result.skipped_images,
            "skipped_paths": sorted(self.skipped)[:100],
            "architecture": self.model.architecture(),
            "denoiserep": self.dr_settings,
            "preprocess": self.preprocess.to_dict(),
            "training": self.training_summary(result.epochs),
        }
        tmp = self.run_dir / f".{SUMMARY_NAME}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.run_dir / SUMMARY_NAME)


def _compact(result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation result without the bulky per-rank curve and per-trial lists (for logs)."""
    return {k: v for k, v in result.items() if k not in ("cmc_curve", "trials")}


def _take(loader: DataLoader, steps: int) -> Iterator[Any]:
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        yield batch


def train(config: Config, run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Runs one stage; see :class:`Trainer`."""
    return Trainer(config, run_dir, **kwargs).fit()
