"""Interim: demo is registered in freezeframe.cli.train."""
from freezeframe.cli.train import app  # noqa: F401
