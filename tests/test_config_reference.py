"""`jaxtrain config`: the resolved config, the key listing and docs/config.md, all from
the config dataclasses."""

from pathlib import Path

import yaml

from jaxtrain.cli import main
from jaxtrain.cli_config import REGENERATE, reference_markdown
from jaxtrain.config import keys
from jaxtrain.finetune.config import FinetuneRunConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits_cnn.yaml"


def test_docs_config_md_is_generated_from_the_dataclasses():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == reference_markdown(), (
        f"docs/config.md disagrees with the config dataclasses; regenerate it: {REGENERATE}")
    for key, _, _, doc in keys(FinetuneRunConfig):
        assert f"| `{key}` |" in written and doc


def test_config_prints_every_default_and_is_a_fixed_point(tmp_path, capsys):
    assert main(["config", str(CONFIG), "train.steps=5"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    # from the file, the override, and defaults the file does not mention
    assert printed["model"] == {"name": "cnn", "channels": 16, "features": 64}
    assert printed["train"]["steps"] == 5 and printed["train"]["microbatches"] == 1
    assert printed["checkpoint"]["async"] is True and printed["sharding"]["mesh"]["fsdp"] == 1
    flat = {k for k, *_ in keys(FinetuneRunConfig) if not k.startswith("finetune")}
    for key in flat:  # every key of a run config is there
        node = printed
        for part in key.split("."):
            if node is None:
                break
            assert part in node, key
            node = node[part]
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(text)
    assert main(["config", str(resolved)]) == 0
    assert capsys.readouterr().out == text


def test_keys_lists_type_default_and_doc(capsys):
    assert main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(keys(FinetuneRunConfig))
    steps = next(line for line in lines if line.startswith("train.steps "))
    assert steps.split()[:3] == ["train.steps", "int", "1000"] and "total" in steps
    assert any(line.split()[:3] == ["checkpoint.async", "bool", "true"] for line in lines)


def test_config_errors_are_one_line(capsys):
    for args, expect in [([str(CONFIG), "train.stepz=1"], "did you mean 'train.steps'?"),
                         ([str(CONFIG), "checkpoint.every=0"], "must be a positive integer"),
                         ([], "give a CONFIG file")]:
        assert main(["config", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
