"""The version of dpatia, read by packaging and sent in X-Sectra-SoftwareVersion."""

__version__ = "0.1.0"
