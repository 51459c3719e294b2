"""What the simulated SPS serves at its IA-API version (IA-API.md §1.5).

The fake SPS answers ``GET /info`` with its ``version`` and serves an endpoint only
where that version has it, as a real SPS of that age would: quality control (and the
``qualityControl`` object in slide info) from 1.10, the case-level image lists from
1.9.  Older versions answer 404 there, so dpatia's version handling can be tried
against an SPS 4.1 (``dpatia-sps --api-version 1.9``) or 3.4 (``1.8``).
"""

from __future__ import annotations

from typing import Any

from ..models import VersionInfo
from ..sps.info import CASE_LISTS, QUALITY_CONTROL, at_least

#: The DPAT software version that ships each IA-API version (IA-API.md §1.5).
SOFTWARE_OF: dict[str, str] = {
    "1.5": "3.0.0.0",
    "1.6": "3.2.0.0",
    "1.8": "3.4.0.0",
    "1.9": "4.1.0.0",
    "1.10": "4.2.0.0",
}


def version_info(api_version: str) -> VersionInfo:
    """The ``GET /info`` answer of an SPS of IA-API ``api_version``."""
    return VersionInfo(api_version, SOFTWARE_OF.get(api_version, "0.0.0.0"))


def has_quality_control(version: VersionInfo) -> bool:
    """Whether an SPS of ``version`` has ``PUT slides/{id}/qualityControl``."""
    return bool(at_least(version.apiVersion, QUALITY_CONTROL))


def has_case_lists(version: VersionInfo) -> bool:
    """Whether an SPS of ``version`` has the case-level image lists."""
    return bool(at_least(version.apiVersion, CASE_LISTS))


def slide_info_for(version: VersionInfo, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` as an SPS of ``version`` shows it (no ``qualityControl`` before 1.10)."""
    if has_quality_control(version) or "qualityControl" not in info:
        return info
    return {k: v for k, v in info.items() if k != "qualityControl"}


__all__ = [
    "SOFTWARE_OF",
    "has_case_lists",
    "has_quality_control",
    "slide_info_for",
    "version_info",
]
