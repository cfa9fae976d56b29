"""freezeframe shared core: manifest and store formats, configs, registry, errors, provenance, file I/O, ranks (imports no stage)."""

__version__ = "0.1.0"
