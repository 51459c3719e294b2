"""The ``tissue`` analysis: tissue outlines, tissue area in mm² and fragment count.

The package, one concern a module:

* :mod:`.settings`: the ``[tissue]`` keys, declared once (the config reads the section
  with them, a worker parses its ``--setting`` strings with them);
* :mod:`.detection`: :func:`detect_tissue`, pure: a low-resolution RGB image of the
  whole slide in, :class:`TissueFindings` out (regions, areas, counts);
* :mod:`.outlines`: tracing each region's boundaries and simplifying them to a cap;
* :mod:`.analysis`: :func:`analyse`, the analysis callable (``[app] analysis =
  tissue``): it gets an image of the slide from the job with
  :mod:`dpatia_daemon.analyses.images` (a low WSI level through OpenSlide, else the
  pipeline's thumbnail), runs :func:`detect_tissue` with progress and cancellation,
  and turns the findings into an :class:`~dpatia_daemon.analyses.AnalysisResult`.

The method, and why:

1. **Optical density**, summed over R, G and B: ``OD = Σ -log10(I / 255)``.  Glass is
   near white in every channel (OD ≈ 0.05), and any stain absorbs light, so OD rises
   for pink/purple H&E *and* for blue-grey IHC counterstain.  Saturation would miss
   the latter: Ki-67 haematoxylin tissue is barely more saturated than glass
   (max − min ≈ 30 of 255), while its OD is 4–5× the glass's.  OD is also close to
   linear in the intensity near the threshold, so a pixel half covered by tissue sits
   near the middle of the two classes and areas are not biased at coarse resolution.
2. A Gaussian blur (σ = 1 px) damps JPEG noise and nuclear texture, then **Otsu's
   threshold**, refined to the midpoint of the two classes' medians (see
   :func:`tissue_threshold`), so a boundary pixel half covered by tissue is cut in
   half and areas stay unbiased even at 16 µm/px.  It is never allowed below
   ``background + min_od`` (background: the 5th percentile of OD, i.e. the glass),
   so a slide with no tissue yields no tissue instead of a split of the glass's noise.
3. Connected regions (8-connected); regions smaller than ``min_area_mm2`` are specks
   and are dropped, holes smaller than ``min_hole_mm2`` are filled.  Larger holes
   (lumina, fat) stay out of the area and are outlined as polygons of their own.
4. Each region's outer boundary (and each kept hole) is traced with marching squares
   and simplified with Douglas–Peucker (``simplify_px``, at analysis resolution); the
   tolerance doubles until all outlines together have at most ``max_points`` points,
   since the SPS draws every point.
5. Areas come from pixel counts × (µm per analysis pixel)²; the simplified polygon's
   area is reported beside it.

Scikit-image does the image work (Otsu, blur, labelling, marching squares); the
simplification is a vectorised Douglas–Peucker (:func:`simplify_rings`: scikit-image's
result, without its per-point Python cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr
from .settings import TissueSettings

if TYPE_CHECKING:
    from ..images import AnalysisImage, choose_level, read_slide, read_thumbnail
    from .analysis import STROKE, analyse, to_result
    from .detection import TissueFindings, TissueRegion, detect_tissue
    from .outlines import simplify_rings

#: Where each of the package's names is.  They load on first use: the daemon imports
#: :mod:`.settings` (through the config) and must not pay for numpy and scikit-image,
#: which only workers running the analysis need.
_LAZY = {
    "AnalysisImage": "..images",
    "choose_level": "..images",
    "read_slide": "..images",
    "read_thumbnail": "..images",
    "STROKE": ".analysis",
    "analyse": ".analysis",
    "to_result": ".analysis",
    "TissueFindings": ".detection",
    "TissueRegion": ".detection",
    "detect_tissue": ".detection",
    "simplify_rings": ".outlines",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "STROKE",
    "AnalysisImage",
    "TissueFindings",
    "TissueRegion",
    "TissueSettings",
    "analyse",
    "choose_level",
    "detect_tissue",
    "read_slide",
    "read_thumbnail",
    "simplify_rings",
    "to_result",
]
