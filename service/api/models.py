"""``/v1/models``: the model versions this process serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import Scope, State, authorize
from service.api.schemas import ModelOut
from service.embedder import ModelRuntime, ModelUnavailableError
from service.http.problems import PROBLEM_RESPONSES, Problem

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(authorize(Scope.READ))],
    responses=PROBLEM_RESPONSES,
)


def model_out(runtime: ModelRuntime, *, default: bool) -> ModelOut:
    meta = runtime.model.meta
    return ModelOut(
        name=runtime.name,
        version=runtime.version,
        kind=runtime.kind,
        dim=runtime.dim,
        input_size=list(runtime.model.input_size),
        architecture=meta.get("architecture"),
        evaluation=meta.get("evaluation"),
        default=default,
        device=str(runtime.model.device),
        dtype=str(runtime.model.dtype).removeprefix("torch."),
        runtime=runtime.model.runtime,
    )


@router.get("", summary="List served models")
def list_models(state: State) -> list[ModelOut]:
    return [
        model_out(r, default=state.models.get(r.name) is r)
        for r in sorted(state.models, key=lambda r: (r.name, r.version))
    ]


@router.get("/{name}", summary="Describe a model (its default version)")
def get_model(name: str, state: State, version: str | None = None) -> ModelOut:
    try:
        runtime = state.models.get(name, version)
    except ModelUnavailableError as exc:
        raise Problem(404, "Model not found", str(exc), slug="model-not-found") from exc
    return model_out(runtime, default=state.models.get(name) is runtime)
