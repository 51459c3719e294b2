"""The pipeline's settings: the ``[pipeline]`` section, and all a worker needs to fetch
a slide (:class:`PipelineSettings`, which travels to the worker as JSON).

A module of its own, with nothing heavier than attrs behind it, because the config
reads the ``[pipeline]`` section with :class:`PipelineConfig`.
"""

from __future__ import annotations

import json

from attrs import asdict, frozen

from ..sections import at_least, greater_than, key


@frozen
class PipelineConfig:
    """The ``[pipeline]`` section: how a worker fetches a slide before the analysis
    (declared here, once; the config reads the section with this class)."""

    thumbnail_mpp: float = key(16.0, greater_than(0))
    tile_concurrency: int = key(16, at_least(1))
    download_wsi: bool = key(True)
    download_idle_timeout: float = key(120.0, greater_than(0))


@frozen
class PipelineSettings(PipelineConfig):
    """What the worker needs to fetch a slide: the ``[pipeline]`` section and the few
    keys of other sections its SPS client needs (``Config.pipeline_settings()`` fills
    them in; the defaults here are theirs, which a test checks).

    Passed to the worker as JSON on its command line (no secrets: the callback token is
    read from the job's 0600 ``job.json``, client credentials from the worker's
    environment; ``application_id`` goes with them to ``POST /token``).
    """

    include_phi: bool = False
    sps_timeout: float = 30.0
    sps_retries: int = 4
    verify_tls: bool = True
    ca_file: str | None = None
    api_version: str = "1.5"
    application_id: str = "dpatia"

    def to_json(self) -> str:
        """The settings as the JSON of the worker's ``--pipeline`` option."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PipelineSettings:
        """The settings from :meth:`to_json`'s text."""
        return cls(**json.loads(text))


__all__ = ["PipelineConfig", "PipelineSettings"]
