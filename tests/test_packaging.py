"""The distribution's layout: alignlib.kernels comes from the top-level kernels/ folder,
and no top-level `kernels` module is installed (transformers probes that name). The test
environment is pinned: README's test command and .ci/run install through one constraints file,
while the package's own requirements stay open."""

import importlib.util
import re
from pathlib import Path

import alignlib.kernels
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_alignlib_kernels_is_the_kernels_folder():
    installed = Path(alignlib.kernels.__file__)
    assert installed.read_text() == (REPO / "kernels" / "__init__.py").read_text()


def test_no_top_level_kernels_module_from_this_repo():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in Path(spec.origin or "").resolve().parents


# ----------------------------------------------------------------------------------------------
# The pinned test environment: README's test command and .ci/run install through one constraints file
# ----------------------------------------------------------------------------------------------

TEST_INSTALL = re.compile(r'pip install -e "\.\[test\]" -c (\S+)')


def readme_test_command() -> str:
    commands = [line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("python3 -m venv") and line.rstrip().endswith("&& pytest")]
    assert len(commands) == 1, commands
    return commands[0]


def readme_constraints() -> str:
    match = TEST_INSTALL.search(readme_test_command())
    assert match, "README's test command installs the test extra without a constraints file (-c FILE)"
    return match.group(1)


def ci_install_lines() -> list[str]:
    return [line for line in (REPO / ".ci" / "run").read_text().splitlines()
            if TEST_INSTALL.search(line) and not line.lstrip().startswith("#")]


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blank lines aside)."""
    result = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>=!~;,\s]", name + version), f"not a pin: {line!r}"
            result[name.lower().replace("_", "-")] = version
    return result


def test_readme_and_ci_install_the_tests_through_the_same_constraints_file():
    readme = readme_constraints()
    ci = [TEST_INSTALL.search(line).group(1) for line in ci_install_lines()]
    assert ci == [readme], f".ci/run installs the test extra with {ci or 'no constraints file'}, README with {readme}"
    assert (REPO / readme).is_file(), readme


def test_constraints_pin_torch_and_trl_and_the_readme_installs_that_torch():
    constraints = pins(REPO / readme_constraints())
    assert constraints.get("torch") == "2.13.0", constraints.get("torch")
    assert re.fullmatch(r"1\.16\.\d+", constraints.get("trl", "")), constraints.get("trl")
    torch_installs = re.findall(r"pip install torch==(\S+)", readme_test_command() + "\n"
                                + (REPO / ".ci" / "run").read_text().split("\nset ", 1)[-1])
    assert torch_installs and set(torch_installs) == {constraints["torch"]}, torch_installs
    assert {"transformers", "peft", "datasets", "pytest", "hypothesis"} <= constraints.keys()


def test_the_package_requirements_stay_open():
    """Users get lower bounds only; the pins live in the constraints file, for the tests."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert not re.search(r"==|<|~=", requirement.split(";")[0]), f"a pin or upper bound for users: {requirement}"
