"""docs/architecture.md names only files, modules, functions and classes that exist."""
from __future__ import annotations

import ast
import builtins
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("pipeline", "manifests", "synth", "extract", "train", "freezeframe")


def _definitions() -> set[str]:
    """Every name a library module defines: functions, classes, methods, assigned names."""
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _resolve_dotted(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _file_exists(token: str) -> bool:
    if (REPO / token).exists():
        return True
    # a bare file name listed under its package ("`hmdb51.py`" in the manifests/ line)
    return "/" not in token and any(p.name == token for pkg in PACKAGES for p in (REPO / pkg).rglob(token))


def test_architecture_doc_names_only_what_exists() -> None:
    text = DOC.read_text()
    tokens = re.findall(r"`([^`\n]+)`", text)
    # the data-path picture: "<file>  <names>" columns
    block = text.split("## The data path")[1].split("```")[1]
    for line in block.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) == 3:
            tokens.append(cols[1])
            tokens += re.findall(r"[A-Za-z_][A-Za-z0-9_.]*(?=[:,(]|$)", cols[2].split(":")[0])
    defined = _definitions()
    missing = []
    for tok in tokens:
        tok = re.sub(r"\(.*\)$", "", tok.strip())  # "fit(cfg)" -> "fit"
        if "<" in tok or tok.startswith(("..", "-", "[", "_")) or " " in tok or hasattr(builtins, tok):
            continue
        if tok.endswith((".py", "/")):
            ok = _file_exists(tok)
        elif tok.split(".")[0] in PACKAGES and "." in tok:
            ok = _resolve_dotted(tok)
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", tok) and (
                "_" in tok.split(".")[0] or tok[0].isupper()):
            ok = all(part in defined for part in tok.split("."))  # run_extract, FeatureStore.features
        else:
            continue  # words: command names, task names, JSON keys
        if not ok:
            missing.append(tok)
    assert missing == [], f"docs/architecture.md names what does not exist: {sorted(set(missing))}"
