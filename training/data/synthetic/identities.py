"""The look of each synthetic identity, drawn once from (seed, identity) and cached."""

from __future__ import annotations

from functools import lru_cache

from training.data.synthetic.persons import PersonIdentity, random_person
from training.data.synthetic.scene import STREAM_EXTRA, STREAM_IDENTITY, rng_for
from training.data.synthetic.vehicles import BODY_TYPES, MODELS, VehicleIdentity, random_vehicle


@lru_cache(maxsize=4096)
def person_identity(seed: int, identity: int) -> PersonIdentity:
    return random_person(rng_for(seed, STREAM_IDENTITY, identity))


@lru_cache(maxsize=4096)
def vehicle_identity(seed: int, identity: int) -> VehicleIdentity:
    return random_vehicle(rng_for(seed, STREAM_IDENTITY, identity))


def stranger(seed: int, number: int, kind: str) -> PersonIdentity | VehicleIdentity:
    """Someone who is not one of the dataset's identities (what a false detection shows)."""
    rng = rng_for(seed, STREAM_EXTRA, number)
    return random_person(rng) if kind == "person" else random_vehicle(rng)


def vehicle_labels(seed: int, identity: int) -> dict[str, int]:
    """0-based colour, model and body-type indices of a vehicle (what VehicleID/VeRi record)."""
    vehicle = vehicle_identity(seed, identity)
    return {
        "colour": vehicle.colour,
        "model": vehicle.model,
        "type": BODY_TYPES.index(MODELS[vehicle.model].body_type),
    }
