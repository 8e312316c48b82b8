"""The README's Python snippets run, in order, in a scratch directory."""

import os
import re

from conftest import ROOT


def test_readme_snippets_run(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks[0] == (ROOT / "examples" / "quickstart.py").read_text()  # the README's main command runs this
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {"__name__": "__readme__"}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "FusionLlavaForConditionalGeneration sees 16 visual tokens" in printed
    assert printed.count("ASSISTANT") >= 2
