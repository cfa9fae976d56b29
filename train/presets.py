"""Recipe presets: named layers of training values under a dataset's own config file.

``paper``: AdViSe as the paper's text reports it; ``released``: what the released code runs.
Each is a TOML file in ``train/recipes/`` with ``[common]``, ``[pretrain]`` and ``[finetune]``
tables; a dataset file (``train/configs/<dataset>.toml``) names its preset with
``recipe = "..."`` in ``[common]`` (``--set recipe=released`` switches) and may add
per-dataset recipe values in ``[<preset>.<table>]`` tables (e.g. ``[paper.finetune]`` for
Diving48). Resolution order: dataclass defaults <- preset ``[common]`` <- preset
``[<table>]`` <- dataset ``[common]`` <- dataset ``[<table>]`` <- dataset
``[<preset>.<table>]`` <- ``--config`` file (same tables) <- ``--set`` overrides.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import load_toml
from pipeline.registry import Registry

__all__ = ["PRESETS", "PRESET_DIR", "preset_layers"]

PRESET_DIR = Path(__file__).resolve().parent / "recipes"

#: preset name -> its TOML file
PRESETS: Registry[Path] = Registry("recipe preset")
PRESETS.add("paper", PRESET_DIR / "paper.toml")
PRESETS.add("released", PRESET_DIR / "released.toml")


def preset_layers(name: str, table: str) -> list[dict]:
    """The preset's ``[common]`` and ``[table]`` dicts, in order (``name`` "" = no preset)."""
    if not name:
        return []
    t = load_toml(PRESETS.get(name))
    return [t.get("common", {}), t.get(table, {})]
