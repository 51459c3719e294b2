"""dpatia: a Sectra DPAT IA-API server-side app daemon on Twisted."""

from ._version import __version__

__all__ = ["__version__"]
