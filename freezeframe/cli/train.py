"""Stage-2 commands (interim: registered from train/cli.py until it moves here)."""
from __future__ import annotations

from freezeframe.cli.common import new_app
from train.cli import register

app = new_app("Stage 2: stats, pretrain, finetune, evaluate, report (and demo).")
register(app)
