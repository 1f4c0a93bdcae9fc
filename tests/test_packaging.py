"""The distribution's layout: alignlib.kernels comes from the top-level kernels/ folder,
and no top-level `kernels` module is installed (transformers probes that name)."""

import importlib.util
from pathlib import Path

import alignlib.kernels

REPO = Path(__file__).resolve().parents[1]


def test_alignlib_kernels_is_the_kernels_folder():
    installed = Path(alignlib.kernels.__file__)
    assert installed.read_text() == (REPO / "kernels" / "__init__.py").read_text()


def test_no_top_level_kernels_module_from_this_repo():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in Path(spec.origin or "").resolve().parents
