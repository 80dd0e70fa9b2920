"""`inferaligner align`: one run from a tiny target to a folder that loads, serves, evaluates and inspects; resumed
step by step; every teacher kind; bad inputs as one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import QUICK, REFUSAL
from test_teachers import Endpoint, completion

from inferaligner import InferAligner, SafetyVectors
from inferaligner.align import AlignOptions, align
from inferaligner.align.evaluation import is_correct
from inferaligner.align.recipe import wider_scales
from inferaligner.align.steps import Steps
from inferaligner.aligned_folder import AlignedFolder
from inferaligner.calibrate import choose
from inferaligner.cli import main
from inferaligner.errors import InferAlignerError, PromptError
from inferaligner.settings import SteeringSettings
from inferaligner.teachers import EndpointTeacher, FileTeacher, ModelTeacher, TeacherError

FILES = ("aligned.json", "gate.safetensors", "steering.safetensors", "settings.json", "README.md", "report.html")


def test_the_folder_holds_everything_and_says_what_it_is(aligned_run) -> None:
    folder: AlignedFolder = aligned_run["folder"]
    assert all((folder.path / name).is_file() for name in FILES)
    facts = folder.manifest
    assert facts["model"] == str(aligned_run["model"]) and facts["teacher_refusals"] == {"asked": 40, "kept": 40}
    assert facts["domain"] == {"file": str(aligned_run["domain"]), "gate": 16, "held_out": 4}
    assert set(facts["step_seconds"]) == {"check", "gate", "teacher", "fit", "calibrate", "evaluate"}
    card = (folder.path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: inferaligner\n") and f"base_model: {aligned_run['model']}" in card
    assert "InferAligner.from_pretrained" in card and "40 of 40" in card
    teacher = [json.loads(line) for line in (folder.path / ".align" / "teacher.jsonl").read_text().splitlines()]
    assert teacher[0] == {"prompt": teacher[0]["prompt"], "answer": REFUSAL, "kept": True}


def test_a_tiny_target_that_learns_no_refusal_is_warned_about_in_the_card(aligned_run) -> None:
    facts = aligned_run["folder"].manifest
    assert any("refused only" in w for w in facts["warnings"])  # three fit steps on random weights teach nothing
    assert "**Warning:**" in (aligned_run["folder"].path / "README.md").read_text()


def test_the_folder_loads_generates_and_refuses_another_model(aligned_run, tmp_path) -> None:
    folder = aligned_run["folder"].path
    aligner = InferAligner.from_pretrained(folder)
    assert aligner.gate is not None and aligner.steering_vectors is not None
    assert aligner.alpha == 1.0
    done = aligner.complete(["What is 2 plus 4?"], max_new_tokens=4)
    assert done[0].gate is not None
    from tiny import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model("llama", layers=3).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(InferAlignerError, match=r"was aligned for .* not for"):
        InferAligner.from_pretrained(folder, model=str(other))


def test_a_second_run_skips_every_step_and_force_redoes_one(aligned_run) -> None:
    folder = aligned_run["folder"].path
    steering = (folder / "steering.safetensors").read_bytes()
    lines: list[str] = []
    align(aligned_run["options"], lines.append)
    assert sum("skipped" in line for line in lines) == 6, lines
    assert (folder / "steering.safetensors").read_bytes() == steering
    lines.clear()
    align(replace(aligned_run["options"], force=frozenset({"fit"})), lines.append)
    ran = [line.split(":")[0] for line in lines if line.endswith(": running")]
    assert ran == ["fit", "calibrate", "evaluate"], lines  # new vectors: the steps that read them run again


def test_a_new_gate_rate_rebuilds_the_gate_and_what_reads_it_only(aligned_run, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(aligned_run["folder"].path, copy)
    lines: list[str] = []
    align(replace(aligned_run["options"], out=copy, gate_tpr=0.99), lines.append)
    ran = [line.split(":")[0] for line in lines if line.endswith(": running")]
    assert ran == ["gate", "evaluate"], lines  # the fit and the calibration do not read the gate
    assert SafetyVectors.load(copy / "gate.safetensors").gate.target_tpr == 0.99
    assert "set to fire on 99% of held-out harmful training prompts" in (copy / "README.md").read_text()
    for bad in (["--gate-tpr", "0"], ["--gate-tpr", "nan"], ["--gate-tpr", "1.5"], ["--widen", "9"], ["--widen", "-1"]):
        with pytest.raises(SystemExit):  # argparse: one line naming the option, nothing run
            main(["align", "--teacher", "x.jsonl", "--domain-prompts", "d", "--out", str(tmp_path / "x"), *bad])
        assert not (tmp_path / "x").exists()


def test_an_interrupted_step_runs_again_and_finished_ones_do_not(tmp_path) -> None:
    calls: list[str] = []
    out = tmp_path / "a.txt"

    def interrupted() -> None:
        calls.append("a")
        raise KeyboardInterrupt

    steps = Steps(tmp_path, ("a", "b"), log=lambda _: None)
    steps.run("b", {"x": 1}, [], lambda: calls.append("b"))
    with pytest.raises(KeyboardInterrupt):
        steps.run("a", {"x": 1}, [out], interrupted)
    again = Steps(tmp_path, ("a", "b"), log=lambda _: None)
    assert again.run("b", {"x": 1}, [], lambda: calls.append("b")) is False
    assert again.run("a", {"x": 1}, [out], lambda: (calls.append("a"), out.write_text("done"))) is True
    assert again.run("a", {"x": 2}, [out], lambda: calls.append("a")) is True  # new inputs: run again
    assert calls == ["b", "a", "a", "a"]
    with pytest.raises(InferAlignerError, match="--force takes steps among a, b"):
        Steps(tmp_path, ("a", "b"), force=frozenset({"c"}))


def test_an_endpoint_teacher_aligns_through_the_command_line(aligned_run, tmp_path) -> None:
    with Endpoint(lambda body, count: (200, completion(REFUSAL))) as endpoint:
        code = main(
            [
                "align",
                "--model",
                str(aligned_run["model"]),
                "--teacher-url",
                endpoint.url,
                "--teacher-model",
                "guard",
                "--teacher-rate",
                "500",
                "--domain-prompts",
                str(aligned_run["domain"]),
                "--out",
                str(tmp_path / "out"),
                "--no-public",
                "--limit",
                "8",
                "--fit-steps",
                "3",
                "--scales",
                "1",
                "--widen",
                "0",
                "--eval-limit",
                "2",
                "--min-refusals",
                "4",
            ]
        )
    assert code == 0
    facts = json.loads((tmp_path / "out" / "aligned.json").read_text())
    assert facts["teacher"] == f"guard at {endpoint.url}" and facts["teacher_refusals"]["kept"] == 16
    assert len(endpoint.requests) == 16
    log = (tmp_path / "out" / "align.log").read_text()
    assert "estimate: about" in log and "teacher: finished" in log
    assert [r["strength"] for r in facts["calibration"]] == [1.0]  # --widen 0: the strengths asked for only


def row(strength: float, refusal: float, kept: float = 0.9) -> dict:
    return {
        "strength": strength,
        "harmful_refusal": refusal,
        "harmful_degenerate": 0.0,
        "benign_kept": kept,
        "benign_degenerate": 0.0,
    }


def test_calibration_widens_only_while_the_strongest_is_chosen_and_refuses_too_little() -> None:
    gemma = [row(0.75, 0.16), row(1.0, 0.47), row(1.25, 0.76)]  # zoo:gemma-target's first calibration
    assert wider_scales(gemma) == (1.667, 2.083)
    assert wider_scales([*gemma, row(1.667, 0.93), row(2.083, 0.99, kept=0.5)]) == ()  # 1.667 chosen: enough
    assert wider_scales([row(1.0, 0.5), row(1.5, 0.5, kept=0.4)]) == ()  # a weaker strength is chosen
    assert wider_scales([row(1.0, 0.95)]) == ()  # the goal is met


def test_the_calibration_table_holds_each_widening_round(aligned_run) -> None:
    settings = SteeringSettings.load(aligned_run["folder"].settings)
    strengths = [r["strength"] for r in settings.table]
    assert strengths[0] == 1.0 and tuple(strengths[1:]) == wider_scales(settings.table[:1])  # QUICK: one round
    assert settings.alpha == choose(settings.table)["strength"]
    if len(strengths) > 1:
        assert any("refuses too little; trying" in line for line in aligned_run["log"])


def test_a_teacher_that_never_refuses_stops_the_run_with_one_line(aligned_run, tmp_path) -> None:
    from inferaligner.loading import load

    options = AlignOptions(
        model=str(aligned_run["model"]),
        teacher=ModelTeacher(str(aligned_run["model"]), load),
        domain=aligned_run["domain"],
        out=tmp_path / "out",
        progress=False,
        **QUICK,
    )
    with pytest.raises(TeacherError, match="refused 0 of 16 harmful prompts coherently"):
        align(options, lambda _: None)
    assert json.loads((tmp_path / "out" / ".align" / "steps.json").read_text()).keys() == {"check", "gate"}


def quick(aligned_run, out: Path, **changes) -> AlignOptions:
    return replace(aligned_run["options"], out=out, **changes)


def test_bad_domain_files_are_one_line_errors(aligned_run, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PromptError):
        align(quick(aligned_run, tmp_path / "a", domain=empty), lambda _: None)
    few = tmp_path / "few.txt"
    few.write_text("What is 1 plus 1?\nWhat is 2 plus 2?\n")
    with pytest.raises(PromptError, match="holds 2 prompts: give at least 4"):
        align(quick(aligned_run, tmp_path / "b", domain=few), lambda _: None)
    with pytest.raises(PromptError, match="does not exist"):
        align(quick(aligned_run, tmp_path / "c", domain=tmp_path / "missing.txt"), lambda _: None)


def test_a_domain_file_of_harmful_requests_is_refused(aligned_run, tmp_path) -> None:
    from inferaligner.prompts import gate_sets

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(gate_sets("extraction")[0][:60]))
    with pytest.raises(PromptError, match="read as harmful requests to the target"):
        align(quick(aligned_run, tmp_path / "out", domain=harmful), lambda _: None)


def test_a_target_without_a_chat_template_is_a_one_line_error(aligned_run, tmp_path) -> None:
    from tiny import tiny_model, tiny_tokenizer

    bare = tmp_path / "bare"
    tiny_model("llama").save_pretrained(bare)
    tiny_tokenizer(chat_template=False).save_pretrained(bare)
    with pytest.raises(InferAlignerError, match="has no chat template"):
        align(quick(aligned_run, tmp_path / "out", model=str(bare)), lambda _: None)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "holds no aligned.json"),
        ({"aligned.json": "{not json"}, "is not valid JSON"),
        ({"aligned.json": '{"format": "other"}'}, "is not an aligned folder's manifest"),
        ({"aligned.json": '{"format": "inferaligner.aligned"}'}, "lacks gate.safetensors"),
    ],
)
def test_a_folder_that_is_not_an_aligned_one_is_a_one_line_error(tmp_path, files, message) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(InferAlignerError, match=message):
        AlignedFolder.load(tmp_path)


def test_generate_eval_and_inspect_take_the_folder(aligned_run, capsys) -> None:
    folder = str(aligned_run["folder"].path)
    assert main(["generate", "--aligned", folder, "--max-new-tokens", "4", "--json", "What is 1 plus 2?"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["gate"] is not None
    assert main(["inspect", folder]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"aligned folder for {aligned_run['model']}") and "== gate.safetensors" in out
    assert main(["inspect", folder, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "inferaligner.aligned"


def test_serve_takes_the_folder(aligned_run) -> None:
    from test_serve import free_port, start_server

    port = free_port()
    folder = str(aligned_run["folder"].path)
    process = start_server(
        [sys.executable, "-m", "inferaligner.cli", "serve", "--aligned", folder, "--port", str(port)], port
    )
    try:
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [str(aligned_run["model"])]
        body = {"model": str(aligned_run["model"]), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
        assert answer["inferaligner"]["gate"] is not None
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_eval_takes_the_folder(aligned_run, tmp_path, data_dir) -> None:
    folder = str(aligned_run["folder"].path)
    code = main(
        ["eval", "--aligned", folder, "--methods", "target,inferaligner", "--limit", "2", "--out", str(tmp_path)]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"target", "inferaligner"}


@pytest.mark.parametrize(
    ("text", "answer", "correct"),
    [
        ("3 + 4 = 7. The answer is 7.", "7", True),
        ("The answer is 7, not 17", "7", False),
        ("It costs 1,200 dollars.", "1200", True),
        ("The sentiment is Positive.", "positive", True),
    ],
)
def test_domain_answers_are_checked_by_their_last_number_or_their_text(text, answer, correct) -> None:
    assert is_correct(text, answer) is correct


def test_each_teacher_kind_is_chosen_from_the_command_line(aligned_run, tmp_path) -> None:
    from inferaligner.cli import build_parser
    from inferaligner.cli.align import _teacher

    def parsed(*extra: str):
        return build_parser().parse_args(["align", "--domain-prompts", "d", "--out", str(tmp_path), *extra])

    assert isinstance(_teacher(parsed("--teacher", str(aligned_run["teacher"])), tmp_path), FileTeacher)
    assert isinstance(_teacher(parsed("--teacher", "zoo:aligned"), tmp_path), ModelTeacher)
    url = parsed("--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m")
    assert isinstance(_teacher(url, tmp_path), EndpointTeacher)
    with pytest.raises(InferAlignerError, match="Name a teacher"):
        _teacher(parsed(), tmp_path)
    with pytest.raises(InferAlignerError, match="not both"):
        _teacher(parsed("--teacher", "x", "--teacher-url", "http://h/v1", "--teacher-model", "m"), tmp_path)
