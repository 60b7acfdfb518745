"""`fluxion eval --true-cfg-schedule`: a guidance schedule is scored like a constant scale, reaches the pipeline as
given and is recorded; a bad spec or both flags at once are refused before the model loads."""
import json

from fluxion.cli import main
from fluxion.eval import run as R


def test_the_schedule_reaches_the_pipeline_and_is_recorded(tmp_path, monkeypatch):
    seen = []
    real = R.generate_items

    def recording(pipe, items, **call):
        seen.append(call["true_cfg_scale"])
        return real(pipe, items, **call)

    monkeypatch.setattr(R, "generate_items", recording)
    assert main(["eval", "--limit", "2", "--steps", "2", "--true-cfg-schedule", "linear:3:1.5",
                 "--out", str(tmp_path)]) == 0
    assert seen == ["linear:3:1.5"]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["settings"]["true_cfg_scale"] == "linear:3:1.5" and summary["items"] == 2


def test_a_bad_schedule_or_both_flags_are_refused_by_name(capsys, monkeypatch):
    monkeypatch.setattr(R, "run_eval", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert main(["eval", "--true-cfg-schedule", "linear:3"]) == 2
    assert "guidance schedule 'linear:3' is not one of" in capsys.readouterr().err
    assert main(["eval", "--true-cfg", "2", "--true-cfg-schedule", "linear:3:1"]) == 2
    assert "not both" in capsys.readouterr().err
