"""Finding nuclei in one RGB tile: colour deconvolution, threshold, distance peaks.

:func:`detect_nuclei` is pure (no job, no files, no slide) and thread-safe: numpy,
scipy and scikit-image release the GIL in their inner loops, so several tiles run in
parallel threads.  The method:

1. **Haematoxylin** by colour deconvolution (Ruifrok & Johnston, scikit-image's
   ``hed_from_rgb``): the optical density of each pixel projected on the H stain
   vector.  Only the H channel is computed (:func:`haematoxylin` equals
   ``skimage.color.rgb2hed(rgb)[..., 0]``, in float32 and a third of the memory).
2. A Gaussian blur of σ ≈ 0.5 µm damps JPEG noise, then the fixed ``h_threshold``:
   an optical density is a physical quantity, so one value serves every tile (a
   per-tile threshold would split the stroma of a tile with no nuclei).
3. Blobs smaller than ``min_area_um2`` are dropped.  Each blob is one nucleus, or, when
   it is larger than ``max_area_um2`` (touching nuclei), as many as the peaks of its
   distance transform at least ``min_distance_um`` apart.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.color import hed_from_rgb
from skimage.feature import peak_local_max
from skimage.filters import gaussian

from .settings import NucleiSettings

#: The H column of scikit-image's deconvolution matrix, as float32.
_H_VECTOR = np.asarray(hed_from_rgb[:, 0], dtype=np.float32)
#: rgb2hed's optical density: ``log(max(I/255, 1e-6)) / log(1e-6)``.
_LOG_ADJUST = np.float32(math.log(1e-6))


def haematoxylin(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The haematoxylin channel of ``rgb`` (h, w, 3): ``rgb2hed(rgb)[..., 0]``, float32."""
    od = np.maximum(rgb.astype(np.float32) / np.float32(255), np.float32(1e-6))
    np.log(od, out=od)
    od /= _LOG_ADJUST
    h = np.asarray(od @ _H_VECTOR, dtype=np.float32)
    return np.maximum(h, np.float32(0), out=h)  # as rgb2hed: no negative stain


def detect_nuclei(
    rgb: npt.NDArray[np.uint8], mpp: float, settings: NucleiSettings
) -> npt.NDArray[np.float64]:
    """The centres of the nuclei in ``rgb`` at ``mpp`` µm/px, as (row, col) pixel
    coordinates (fractional: blob centroids), shape (n, 2)."""
    h = haematoxylin(rgb)
    h = gaussian(h, sigma=max(0.5, 0.5 / mpp), preserve_range=True)
    foreground = h > settings.h_threshold
    del h
    labels, count = ndimage.label(foreground)
    if count == 0:
        return np.empty((0, 2))
    px_um2 = mpp * mpp
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:] * px_um2
    kept = areas >= settings.min_area_um2
    index = np.arange(1, count + 1)
    single = index[kept & (areas <= settings.max_area_um2)]
    centres = [np.empty((0, 2))]
    if single.size:
        centres.append(np.asarray(ndimage.center_of_mass(foreground, labels, single)))
    large = index[kept & (areas > settings.max_area_um2)]
    if large.size:
        clumps = np.where(np.isin(labels, large), labels, 0)
        distance = ndimage.distance_transform_edt(clumps > 0)
        distance = gaussian(distance, sigma=1.0, preserve_range=True)
        peaks = peak_local_max(
            distance,
            min_distance=max(1, round(settings.min_distance_um / mpp)),
            threshold_abs=1.0,
            labels=clumps,
            exclude_border=False,
        )
        centres.append(peaks.astype(np.float64))
    return np.concatenate(centres)


__all__ = ["detect_nuclei", "haematoxylin"]
