"""ONNX export of a fused re-identification model, checked through ONNX Runtime before it is kept.

The file computes exactly what ``LoadedModel.embed`` returns (:class:`~training.inference.EmbeddingGraph`:
the model's embedding, L2-normalised in float32) from a float32 NCHW batch of the model's input size,
preprocessed as ``model.json``'s ``input`` section says. Its batch axis is dynamic; a batch of 1 and
one of 8 are run through ONNX Runtime against PyTorch before the file is accepted.

**Exporter.** ``torch.onnx.export(..., dynamo=True)``: the ``torch.export``-based exporter, the
default since torch 2.9 and so on both torch versions the project runs (2.11 on the GPU machines,
2.14 here). The TorchScript exporter (``dynamo=False``) still exists there but is deprecated and
warns on every call. The dynamo exporter needs ``onnxscript`` (the ``onnx`` extra installs it).
Capture (``torch.export``) and conversion are run as two steps so that a failure says which one
failed and, for a conversion failure, which layer holds the operator that has no ONNX translation.

**Opset 18**: the opset in which the exporter's own operator library (torchlib) is written, in both
torch versions, so the graph is built directly, without the ONNX version converter that other opsets
go through. ONNX Runtime runs it from 1.14 on (CPU, CUDA and TensorRT providers). Higher opsets may
be asked for (``opset=``, ``reid export-onnx --opset``); lower ones are refused because they depend
on that converter.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch

from index.snapshot import sha256_file
from training.data.transforms import Preprocess
from training.inference import EmbeddingGraph, probe_batch
from training.onnx_runtime import (
    ONNX_MIN_COSINE,
    ONNX_NAME,
    check_parity,
    create_session,
    require_onnxruntime,
)

__all__ = [
    "INPUT_NAME",
    "ONNX_NAME",
    "ONNX_OPSET",
    "OUTPUT_NAME",
    "OnnxExportError",
    "export_onnx",
]

log = logging.getLogger(__name__)

#: See the module docstring: the exporter's native opset in torch 2.11 and 2.14.
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: Name of the dynamic batch axis in the file (``dim_param``) and in ``model.json``.
BATCH_AXIS = "batch"
#: Batch of the example input: 2, because torch.export specialises a dimension of size 1 to a constant.
_EXAMPLE_BATCH = 2


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX, or its ONNX file does not reproduce its embeddings.

    The message names the layer (module path and type), the operator and the opset when the exporter
    lets them be found.
    """


def _require_exporter(opset: int) -> Any:
    """The ``onnx`` module, checked to have the exporter's dependencies and to know ``opset``."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter imports it; fail here, clearly)
    except ImportError as exc:
        raise OnnxExportError(
            f"ONNX export needs the onnx extra (onnx, onnxscript, onnxruntime): pip install -e '.[onnx]' "
            f"({exc.name} is missing)"
        ) from exc
    newest = onnx.defs.onnx_opset_version()
    if not ONNX_OPSET <= opset <= newest:
        raise OnnxExportError(
            f"opset {opset} cannot be exported: choose {ONNX_OPSET} (the default) to {newest} (the newest "
            f"this onnx {onnx.__version__} knows)"
        )
    return onnx


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _failing_node(program: Any, exc: BaseException) -> Any | None:
    """The graph node the converter failed on: named in its error, or the call of an operator it names."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "call_function"}
    texts = [str(e) for e in _causes(exc)]
    for text in texts:
        for name in re.findall(r"translating node %(\w+)", text):
            if name in nodes:
                return nodes[name]
    for text in texts:
        for op in re.findall(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text):
            target = f"{op[0]}.{op[1]}"
            for node in nodes.values():
                if str(node.target) == target:
                    return node
    return None


def _layer_of(node: Any) -> str:
    """``module.path (ModuleType)`` of the innermost module a graph node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's top level"
    path, kind = list(stack.values())[-1]
    # EmbeddingGraph keeps the model as `.model`: report the model's own module paths.
    path = path.removeprefix("model.") if path != "model" else ""
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return f"{path or '(the model itself)'} ({kind_name.rsplit('.', 1)[-1]})"


def _export_program(model: torch.nn.Module, input_size: tuple[int, int], opset: int, arch: str) -> Any:
    """The model as an ``onnx.ModelProto`` with a dynamic batch axis (capture, then conversion)."""
    graph = EmbeddingGraph(model).eval()
    example = probe_batch(_EXAMPLE_BATCH, input_size, seed=0)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=1 << 16)
    try:
        # The key is EmbeddingGraph.forward's parameter name.
        program = torch.export.export(graph, (example,), dynamic_shapes={"images": {0: batch}}, strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, guard errors...)
        raise OnnxExportError(
            f"torch.export cannot capture {arch} for ONNX opset {opset} with a dynamic batch axis: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    try:
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            optimize=True,
        )
    except Exception as exc:  # OnnxExporterError subclasses, and whatever a translation raises
        node = _failing_node(program, exc)
        where = (
            f"layer {_layer_of(node)}, operator {node.target}"
            if node is not None
            else "a layer the exporter did not name"
        )
        raise OnnxExportError(
            f"{arch} cannot be exported to ONNX opset {opset}: {where} has no ONNX translation "
            f"({type(exc).__name__}: {_summary(exc)}). Replace that layer, or try another opset "
            "(`reid export-onnx --opset`)"
        ) from exc
    proto = onnx_program.model_proto
    _name_batch_axis(proto)
    return proto


def _summary(exc: BaseException) -> str:
    """The innermost cause's first line: the exporter wraps the useful message in generic ones."""
    return _first_line(_causes(exc)[-1])


def _name_batch_axis(proto: Any) -> None:
    """Calls the batch axis ``batch`` everywhere (an exported program names it after a symbol, ``s34``)."""
    graph = proto.graph
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        raise OnnxExportError("the exported ONNX graph has a fixed batch axis; report the backbone")
    for value in (*graph.input, *graph.output, *graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = BATCH_AXIS


def export_onnx(
    model: torch.nn.Module,
    directory: str | Path,
    preprocess: Preprocess,
    *,
    arch: str,
    dim: int,
    feature: str,
    weights_sha256: str,
    opset: int = ONNX_OPSET,
) -> dict[str, Any]:
    """Writes ``directory/model.onnx`` (atomically) and returns the ``onnx`` section of ``model.json``.

    Args:
        model: the plain (fused) eval-mode model, float32, on the CPU; it is not modified.
        directory: the model directory (or the temporary one an export is building).
        preprocess: the model's input contract (size, interpolation, mean, std).
        arch, dim, feature: the backbone name, embedding dimension and feature (for messages and
            for the section).
        weights_sha256: SHA-256 of the ``model.safetensors`` the file is exported from.
        opset: ONNX opset (default :data:`ONNX_OPSET`).

    Raises:
        OnnxExportError: a layer cannot be exported (named), or ONNX Runtime's embeddings of the file
            differ from the model's (min cosine < :data:`~training.onnx_runtime.ONNX_MIN_COSINE`).
    """
    onnx = _require_exporter(opset)
    directory = Path(directory)
    model = model.eval()
    proto = _export_program(model, preprocess.size, opset, arch)
    contract = {
        "input": {
            "name": INPUT_NAME,
            "shape": [BATCH_AXIS, 3, *preprocess.size],
            "layout": "NCHW",
            "dtype": "float32",
            "color": "RGB",
            "pixels": "value / 255, then (value - mean) / std per channel",
            **preprocess.to_dict(),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [BATCH_AXIS, int(dim)],
            "dtype": "float32",
            "feature": feature,
            "l2_normalized": True,
            "same_as": "training.export.LoadedModel.embed (torch runtime, float32)",
        },
    }
    # The file describes itself too: whoever receives model.onnx alone still has the contract.
    onnx.helper.set_model_props(
        proto,
        {"reid.backbone": arch, "reid.weights_sha256": weights_sha256, "reid.contract": json.dumps(contract)},
    )
    path = directory / ONNX_NAME
    tmp = directory / f".{ONNX_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            onnx.save_model(proto, os.fspath(tmp), save_as_external_data=False)
        except ValueError as exc:  # protobuf refuses messages over 2 GB
            raise OnnxExportError(
                f"{arch} is too large for a single-file ONNX model (over 2 GB): {exc}"
            ) from exc
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        session = create_session(tmp, "cpu")
        parity = check_parity(
            EmbeddingGraph(model),
            lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0]),
            preprocess.size,
        )
        if not parity["min_cosine"] >= ONNX_MIN_COSINE:  # NaN never passes
            raise OnnxExportError(
                f"the ONNX export of {arch} (opset {opset}) does not reproduce the model's embeddings in "
                f"ONNX Runtime (min cosine {parity['min_cosine']:.6f} < {ONNX_MIN_COSINE}); the file was "
                "not kept. Try another opset (`--opset`), or report the backbone"
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    section = {
        "file": ONNX_NAME,
        "sha256": sha256_file(path),
        "weights_sha256": weights_sha256,
        "opset": opset,
        "dynamic_axes": {INPUT_NAME: {"0": BATCH_AXIS}, OUTPUT_NAME: {"0": BATCH_AXIS}},
        **contract,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnx {onnx.__version__})",
        "parity": {
            **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in parity.items()},
            "provider": "cpu",
            "onnxruntime": require_onnxruntime().__version__,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    log.info(
        "exported %s to ONNX opset %d (%s, min cosine with torch %.7f)",
        arch,
        opset,
        section["sha256"][:12],
        parity["min_cosine"],
    )
    return section
