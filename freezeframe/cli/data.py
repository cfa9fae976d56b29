"""Interim: synth and weights are registered in freezeframe.cli.extract."""
from freezeframe.cli.extract import app  # noqa: F401
