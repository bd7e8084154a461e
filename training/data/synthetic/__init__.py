"""Synthetic re-identification datasets written in the real datasets' on-disk layouts.

``write_synthetic(out, layout="market1501")`` draws pedestrians (or vehicles) procedurally and
writes them with Market-1501's folders and file names (or VeRi-776's, VehicleID's lists, ...), so
that the real parsers read them unchanged. The modules: :mod:`.scene` (cameras and image
degradations), :mod:`.persons` and :mod:`.vehicles` (drawing), :mod:`.identities` (who looks how),
:mod:`.layouts` (which files, where), :mod:`.writer` (rendering to disk).
"""

from training.data.synthetic.layouts import LAYOUTS
from training.data.synthetic.writer import MARKER, read_marker, write_synthetic

__all__ = ["LAYOUTS", "MARKER", "read_marker", "write_synthetic"]
