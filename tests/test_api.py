"""The Python API: the example of docs/translating.md runs as written (with a shorter training)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

# Shortened for the test suite: a tiny model for 30 steps, short outputs (the example trains 300).
FAST = ('["train.max_steps=30", "train.eval_every=30", "model.d_model=32", "model.heads=2", "model.ff_dim=64", '
        '"model.enc_layers=1", "model.dec_layers=1", "decode.max_len_a=1.0", "decode.max_len_b=5"]')


def readme_example() -> str:
    page = (REPO / "docs" / "translating.md").read_text()
    return re.search(r"## Python API\n\n<!-- run by tests/test_api.py -->\n```python\n(.*?)```", page, re.S).group(1)


@pytest.mark.slow
def test_the_documented_api_example_runs(tmp_path, monkeypatch):
    code = readme_example()
    assert '["train.max_steps=300"]' in code
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_bytes((REPO / "configs/demo.yaml").read_bytes())
    out = io.StringIO()
    monkeypatch.chdir(tmp_path)  # the config's relative paths (data/demo, runs/demo) resolve here
    with contextlib.redirect_stdout(out):
        exec(code.replace('["train.max_steps=300"]', FAST), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("30 ")  # result.step, result.best_bleu
    assert re.fullmatch(r"[\d.]+ nrefs:1\|case:mixed.*", lines[1])  # the test BLEU and its signature
    translations = eval(lines[2])
    assert len(translations) == 2 and translations[1] == ""  # one per line; blank in, blank out
    assert any("<- " in line for line in lines[3:])
    assert (tmp_path / "runs/demo/checkpoints/best.pt").is_file()
    assert Path(tmp_path / "runs/demo/eval/test.json").is_file()
