"""The ``nuclei`` analysis: nuclei found tile by tile in the tissue, their count and density.

A model-like analysis: like a vendor's network it works at high resolution (about
0.5 µm/px), tile by tile, in parallel threads, for minutes on a real slide, and it
returns thousands of shapes.  The package, one concern a module:

* :mod:`.settings`: the ``[nuclei]`` keys, declared once;
* :mod:`.detection`: :func:`detect_nuclei`, pure: one RGB tile in, nucleus centres out
  (colour deconvolution to haematoxylin, a threshold, distance-transform peaks);
* :mod:`.tiles`: :func:`count_nuclei`, the whole slide: the tiles that touch the
  tissue, read with a margin and analysed ``cpu_threads`` at a time in bounded memory,
  with progress per tile and cancellation between tiles;
* :mod:`.analysis`: :func:`analyse`, the analysis callable (``[app] analysis =
  nuclei``): the tissue mask from the ``tissue`` analysis, the count, the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr
from .settings import NucleiSettings

if TYPE_CHECKING:
    from .analysis import STROKE, analyse, tissue_mask, to_result
    from .detection import detect_nuclei, haematoxylin
    from .tiles import NucleiCount, count_nuclei

#: Where each of the package's names is.  They load on first use: the daemon imports
#: :mod:`.settings` (through the config) and must not pay for numpy and scikit-image.
_LAZY = {
    "STROKE": ".analysis",
    "analyse": ".analysis",
    "tissue_mask": ".analysis",
    "to_result": ".analysis",
    "detect_nuclei": ".detection",
    "haematoxylin": ".detection",
    "NucleiCount": ".tiles",
    "count_nuclei": ".tiles",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "STROKE",
    "NucleiCount",
    "NucleiSettings",
    "analyse",
    "count_nuclei",
    "detect_nuclei",
    "haematoxylin",
    "tissue_mask",
    "to_result",
]
