"""``jeat eval --diagnose --fix`` end to end, the per-point trace summary, the report's
diagnosis section, and bad input."""

import csv
import json
import shutil

from conftest import cli_fails, jeat_cli

from jeat.report import render_report


def test_diagnose_and_fix_a_too_weak_attack_from_the_command_line(tmp_path, standard_run):
    run = tmp_path / "run"
    shutil.copytree(standard_run, run)
    per_point = tmp_path / "points.csv"
    weak = "clean,pgd2:step_size=0.001"
    out = jeat_cli("eval", str(run), "--attacks", weak, "--n", "120", "--diagnose", "--fix",
                   "--per-point", str(per_point), "--quiet")  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pgd2:step_size=0.001: incomplete" in text and "RAISED" in text
    assert "after the remedies (added: pgd100" in text
    ev = json.loads((run / "eval.json").read_text())
    assert "incomplete" in ev["diagnosis"]["raised"]
    assert ev["fix"]["attacks"][0].startswith("pgd100")
    assert "step_size" not in ev["fix"]["attacks"][0]  # the default step, not 0.001
    # a standard model: the remedy breaks (nearly) everything the weak attack left
    weak_row = next(r for r in ev["attacks"] if r["attack"] == "pgd2:step_size=0.001")
    assert weak_row["robust_after"] > 80 and ev["fix"]["robust_accuracy"] < 5
    # what the diagnosis' probes broke counts: the headline is never above a probe's figure
    assert ev["robust_accuracy"] <= min(r["robust_after"] for r in ev["attacks"])
    assert ev["fix"]["robust_accuracy"] <= ev["robust_accuracy"]
    assert [c["attack"] for c in ev["fix"]["costs"]] == ev["fix"]["attacks"]
    rows = list(csv.DictReader(per_point.open()))
    assert len(rows) == 120
    robust = [r for r in rows if r["robust"] == "1"]
    assert robust and all("incomplete" in r["indicators"] for r in robust[:5])
    first, last = (
        float(robust[0]["pgd2:step_size=0.001:loss_first"]),
        float(robust[0]["pgd2:step_size=0.001:loss_last"]),
    )
    assert last > first  # still rising: what the indicator read
    page = render_report(run)
    assert '<section id="diagnosis">' in page and "After the remedies" in page
    assert "incomplete" in page


def test_an_honest_table_raises_nothing_and_fix_says_so(tmp_path, pgdat_run):
    run = tmp_path / "run"
    shutil.copytree(pgdat_run, run)
    out = jeat_cli("eval", str(run), "--attacks", "clean,pgd20", "--n", "100", "--diagnose",
                   "--indicators", "silent-success,zero-gradients,unstable,randomised,dynamic",
                   "--fix", "--quiet")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "raised: none" in out.stdout and "no remedy to run" in out.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert ev["diagnosis"]["raised"] == [] and ev["fix"]["attacks"] == []


def test_bad_diagnosis_input_is_one_line_and_exit_2(tmp_path, standard_run):
    run = str(standard_run)
    cli_fails(["eval", run, "--fix"], tmp_path, "--fix", "--diagnose")
    cli_fails(["eval", run, "--diagnose", "--indicators", "nope"], tmp_path, "unknown indicator")
    cli_fails(["eval", run, "--diagnose", "--fix", "--remedies", "magic"], tmp_path,
              "unknown remedy 'magic'")  # fmt: skip
    cli_fails(["eval", run, "--indicators", "incomplete"], tmp_path, "add --diagnose")
    cli_fails(["eval", run, "--attacks", "clean,pgd5:eot=0"], tmp_path, "eot must be >= 1")


def test_eot_is_a_remedy_only_for_a_model_that_is_not_known_deterministic():
    from jeat.diagnose import Diagnosis, ModelCheck, RowDiagnosis

    row = RowDiagnosis("pgd20", 50, {"unstable": 40.0}, ["unstable"])

    def diagnosis(randomised: bool | None) -> Diagnosis:
        checks = [] if randomised is None else [ModelCheck("randomised", randomised, "")]
        return Diagnosis([row], checks, threshold=20.0)

    assert diagnosis(False).remedies() == ["bpda"]  # 5 identical passes agreed
    assert diagnosis(True).remedies() == ["eot", "bpda", "aa-rand"]
    assert diagnosis(None).remedies() == ["eot", "bpda"]  # the check did not run


def test_unroll_is_a_remedy_only_for_a_model_with_a_purifier():
    from jeat.attacks import LinfBall
    from jeat.diagnose import Diagnosis, ModelCheck, RowDiagnosis, remedy_attacks

    row = RowDiagnosis("pgd20", 50, {"zero-gradients": 90.0}, ["zero-gradients"])
    checks = [ModelCheck("randomised", True, ""), ModelCheck("dynamic", True, "")]
    purified = Diagnosis([row], checks, threshold=20.0, unrollable=True)
    assert purified.remedies() == ["unroll", "bpda", "eot", "aa-rand"]
    assert "unroll, bpda" in purified.table()
    quantised = Diagnosis([row], checks[:1], threshold=20.0)  # no purifier: BPDA only
    assert quantised.remedies() == ["bpda", "eot", "aa-rand"]
    assert "unroll" not in quantised.table()

    class _Table:  # remedy_attacks reads only the table's PGD rows and AutoAttack rows
        specs: dict = {}
        rows: list = []
        traces: dict = {}

    attacks = remedy_attacks(_Table(), purified.remedies(), LinfBall(0.2))
    assert attacks == ["pgd20:eot=20:unroll=1:bpda=1", "autoattack:version=rand"]
