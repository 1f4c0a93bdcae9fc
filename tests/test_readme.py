"""The README's example is real code: it equals examples/dpo_loop.py and it trains."""

import contextlib
import io
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- example:start -->\n```python\n(.*?)```\n<!-- example:end -->", text, re.S)
    assert match, "README lost its example markers"
    return match.group(1)


def test_readme_example_is_the_example_file():
    assert readme_example() == (REPO / "examples" / "dpo_loop.py").read_text()


def test_readme_example_runs_and_learns():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__main__"})
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
    assert len(losses) == 10
    assert abs(losses[0] - math.log(2)) < 1e-4  # policy == reference at step 0
    assert losses[-1] < losses[0] - 0.1
