"""freezeframe shared core: manifest and store formats, configs, registry, errors, provenance,
file I/O, ranks. Imports no stage (and never the application, ``freezeframe/``)."""

__version__ = "0.1.0"
