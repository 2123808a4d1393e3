"""The README's tour runs as written (its first two Python blocks)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    monkeypatch.chdir(tmp_path)  # the Trainer block writes runs/cnn
    scope: dict = {}
    exec(compile(blocks[0] + "\n" + blocks[1], str(README), "exec"), scope)
    assert int(scope["state"].step) == 300
    assert scope["trainer"].last_eval["accuracy"] > 0.9
    assert (tmp_path / "runs" / "cnn" / "checkpoints").is_dir()
