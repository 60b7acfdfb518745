"""`fluxion eval --steps-sweep`: one table of accuracy per kind and seconds per image at each step count."""
import json

import pytest

from fluxion.cli import main
from fluxion.eval.run import parse_steps


def test_sweep_reports_each_step_count(tmp_path, capsys):
    assert main(["eval", "--steps-sweep", "1,4", "--limit", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| steps |" in printed and "\n| 1 |" in printed and "\n| 4 |" in printed
    sweep = json.loads((tmp_path / "steps_sweep.json").read_text())["sweep"]
    assert [r["steps"] for r in sweep] == [1, 4]
    assert all(0 <= r["accuracy"]["overall"] <= 1 and r["seconds_per_image_batched"] > 0 for r in sweep)
    # more steps cost more time per image
    assert sweep[1]["seconds_single_image"] > sweep[0]["seconds_single_image"]


@pytest.mark.parametrize("bad", ["", "0,4", "a,b", "2,-1"])
def test_bad_step_lists_are_named(bad):
    with pytest.raises(ValueError, match="--steps-sweep takes whole step counts"):
        parse_steps(bad)


def test_sweep_refuses_steps_alongside(capsys):
    assert main(["eval", "--steps-sweep", "1,2", "--steps", "4"]) == 2
    assert "--steps-sweep sets the steps itself" in capsys.readouterr().err
