"""moondream-server: a self-hosted HTTP server for the Moondream2 vision-language model."""

__version__ = "0.1.0"
