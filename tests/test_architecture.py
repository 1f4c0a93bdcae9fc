"""The import directions of docs/architecture.md, checked on the source.

Every import of every module (lazy ones inside functions too) is read with `ast` and held
against the layer table below, which docs/architecture.md draws: a module may import modules
of a lower layer and of its own package, nothing beside or above it. The losses and the
kernels are checked for third-party imports too (torch and triton only, plus numpy for PPO's
controllers), and the document must name every module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = {
    "alignlib.losses": 0,
    "alignlib.kernels": 0,
    "alignlib.chat": 0,
    "alignlib.recipes": 0,  # YAML files and their index; imports only yaml
    "alignlib.models": 1,
    "alignlib.distributed": 0,
    "alignlib.data.files": 0,
    "alignlib.logprobs": 1,
    "alignlib.configs": 1,
    "alignlib.checkpoint": 1,
    "alignlib.run_folder": 1,
    "alignlib.data": 2,
    "alignlib.objectives": 3,
    "alignlib.run_data": 3,
    "alignlib.rewards": 2,
    "alignlib.fused_lora": 2,
    "alignlib.training": 2,
    "alignlib.metrics": 2,
    "alignlib.saved_models": 2,
    "alignlib.rollout": 3,
    "alignlib.rl_objectives": 3,
    "alignlib.demo": 3,
    "alignlib.trainer": 4,
    "alignlib.rl": 4,
    "alignlib.cli": 5,
    "alignlib.__main__": 6,  # `python -m alignlib`: calls the cli
    "alignlib": 7,  # the package's __init__ imports nothing
}
THIRD_PARTY_ALLOWED = {
    "alignlib.losses": {"torch", "numpy"},
    "alignlib.kernels": {"torch", "triton"},
}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for alignlib/ and the top-level kernels/ (installed as alignlib.kernels)."""
    found = {}
    for path in sorted((REPO / "alignlib").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "kernels").rglob("*.py")):
        stem = path.stem
        found["alignlib.kernels" + ("" if stem == "__init__" else f".{stem}")] = path
    return found


MODULES = modules()
KNOWN = set(MODULES)


def imports(name: str, path: Path) -> list[str]:
    """Every module `name` imports (absolute names; `from alignlib import demo` gives alignlib.demo)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rsplit(".", 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in KNOWN]
            names += submodules or [base]  # `from alignlib import demo` imports alignlib.demo
    return names


def layer_of(name: str) -> tuple[str, int]:
    """The most specific LAYERS entry containing module `name`."""
    matches = [key for key in LAYERS if name == key or name.startswith(key + ".")]
    key = max(matches, key=len)
    return key, LAYERS[key]




def upward_imports(name: str, path: Path) -> list[str]:
    """The imports of module `name` (source in `path`) that do not run downwards (`from alignlib import x`
    counts as importing alignlib.x, not the package root)."""
    own_key, own_layer = layer_of(name)
    own_package = own_key.split(".")[:2]
    wrong = []
    for target in imports(name, path):
        if target not in KNOWN:  # a name imported from a module, or not alignlib at all
            continue
        key, layer = layer_of(target)
        if not (key.split(".")[:2] == own_package or target == name or layer < own_layer):
            wrong.append(f"{name} (layer {own_layer}) imports {target} (layer {layer})")
    return wrong


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_downwards(name):
    assert upward_imports(name, MODULES[name]) == [], "imports must run downwards (docs/architecture.md)"


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_ALLOWED))
def test_losses_and_kernels_import_only_torch(package):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, path in MODULES.items():
        if name != package and not name.startswith(package + "."):
            continue
        for target in imports(name, path):
            top = target.split(".")[0]
            if top in stdlib or target.startswith(package) or not top:
                continue
            assert top in THIRD_PARTY_ALLOWED[package], f"{name} imports {target}"


def test_every_module_is_in_the_architecture_doc_and_the_layer_table():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for name in MODULES:
        assert name in KNOWN and layer_of(name)  # every module has a layer
        short = name.removeprefix("alignlib.")
        leaf = short.rsplit(".", 1)[-1]
        assert f"alignlib.{short}" in doc or f"`{leaf}`" in doc or name == "alignlib", (
            f"docs/architecture.md does not name {name}")


def test_an_upward_or_sideways_import_is_caught(tmp_path):
    source = tmp_path / "objectives.py"
    source.write_text("import torch\nfrom alignlib.losses import dpo_loss\n\n\ndef f():\n"
                      "    from alignlib.trainer import train\n    from alignlib import rollout\n")
    assert upward_imports("alignlib.objectives", source) == [
        "alignlib.objectives (layer 3) imports alignlib.trainer (layer 4)",
        "alignlib.objectives (layer 3) imports alignlib.rollout (layer 3)",
    ]
