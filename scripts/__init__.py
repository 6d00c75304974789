"""Developer tools run by hand or by make targets (not part of the server package)."""
