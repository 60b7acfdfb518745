"""`fluxion eval --seeds N`: every prompt at N noise seeds, the first round being the standard set."""
import json

from fluxion.cli import main


def test_eval_runs_each_prompt_at_each_seed(tmp_path, capsys):
    assert main(["eval", "--limit", "2", "--seeds", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["items"] == 4 and summary["seeds_per_prompt"] == 2
    items = summary["per_item"]
    assert [it["seed"] for it in items] == [1000, 1001, 101000, 101001]
    assert [it["prompt"] for it in items[:2]] == [it["prompt"] for it in items[2:]]
    assert "| **overall** |" in capsys.readouterr().out and (tmp_path / "contact_sheet.png").exists()


def test_probe_refuses_seeds(capsys):
    assert main(["eval", "--probe", "relations", "--seeds", "3"]) == 2
    assert "--probe-seeds sets its seeds" in capsys.readouterr().err


def test_bad_seed_count_is_named_before_loading(capsys):
    assert main(["eval", "--seeds", "0", "--model", "no/such/model"]) == 2
    assert "seeds must be an integer >= 1" in capsys.readouterr().err
