"""Stage-1 commands (interim: registered from extract/cli.py until it moves here)."""
from __future__ import annotations

from extract.cli import register
from freezeframe.cli.common import new_app

app = new_app("Stage 1: plan, extract, status, verify (and synth, weights).")
register(app)
