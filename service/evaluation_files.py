"""Where a finished evaluation keeps its files: its folder, its feature files and its sample list.

The evaluation job writes them (:mod:`service.jobs.evaluate`) and the rank-list views read them back
(:mod:`service.rank_lists`); both take the names from here.
"""

from __future__ import annotations

from pathlib import Path

#: Feature files by split: ``query`` and ``gallery`` for query/gallery protocols, ``all`` for VehicleID.
FEATURE_FILES = {"query": "query.npz", "gallery": "gallery.npz", "all": "features.npz"}
#: The image path of every feature row: ``{"query": [...], "gallery": [...]}``.
SAMPLES_NAME = "samples.json"


def evaluation_dir(data_dir: Path, evaluation_id: int) -> Path:
    """The folder of evaluation ``evaluation_id`` under the service's data directory."""
    return Path(data_dir) / "evaluations" / str(evaluation_id)
