"""The README's Python example runs as written (documentation that cannot rot silently)."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block)
        runpy.run_path(str(script), run_name="__main__")
    assert "['conv_in']" in capsys.readouterr().out
