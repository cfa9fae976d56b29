"""freezeframe shared core: manifests, feature store, configs, provenance and the CLI."""

__version__ = "0.1.0"
