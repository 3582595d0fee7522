import os

import yaml

from raydpo.cli import main as cli


def write(tmp_path, values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_unknown_key_exits_naming_it(tmp_path, capsys):
    path = write(tmp_path, {"model": "m", "train_dataset": "d.jsonl", "betta": 0.1})
    assert cli(["train", path]) == 2
    assert "betta" in capsys.readouterr().err


def test_bad_value_exits_naming_the_field(tmp_path, capsys):
    path = write(tmp_path, {"model": "m", "train_dataset": "d.jsonl"})
    assert cli(["train", path, "--set", "beta=-1"]) == 2
    assert "beta" in capsys.readouterr().err
    assert cli(["sweep", path]) == 2
    assert "search_space" in capsys.readouterr().err


def test_train_from_yaml(ray_session, tiny_model, parity_rows, tmp_path, capsys):
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in parity_rows[:16]))
    path = write(tmp_path, {"model": tiny_model, "train_dataset": str(data), "output_dir": str(tmp_path / "out"),
                            "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1})
    assert cli(["train", path, "--set", "beta=0.2", "--set", "num_workers=0"]) == 0  # local mode: in this process
    assert "done: 2 steps" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out" / "config.json")


def test_data_summary(ray_session, tiny_model, parity_rows, tmp_path, capsys):
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in parity_rows[:10]))
    # "<s> number d d d is" is 6 tokens, plus " even</s>": every pair is longer than 7 and gets cut.
    assert cli(["data", str(data), "--model", tiny_model, "--max-length", "7"]) == 0
    out = capsys.readouterr().out
    assert "rows: 10" in out and "truncated: 10 pair(s)" in out and "standard" in out
