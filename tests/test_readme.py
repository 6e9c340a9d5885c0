"""The README's commands and code are the ones CI runs and the tests execute."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].rstrip().endswith("lowprec demo")
    assert first[1].rstrip().endswith("pytest")
    # .ci/run executes this second line verbatim
    assert "sed -n 2p" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_runs():
    code = _blocks("python")[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
