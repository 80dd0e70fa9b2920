"""The evaluation harness on tiny models and tiny data: tasks, scoring, caching, judges, reports."""

from __future__ import annotations

import json

import pytest
from test_aligner import make_aligner
from tiny import tiny_model, tiny_tokenizer

from inferaligner.errors import PromptError
from inferaligner.eval import tasks as task_module
from inferaligner.eval.choices import choice_scores, choose
from inferaligner.eval.defences import GOAL_PRIORITY, SELF_REMINDER
from inferaligner.eval.generation import gate_all, gated_completions, generate_cached
from inferaligner.eval.methods import build_methods
from inferaligner.eval.report import outcome_table, over_refusal_table, safety_table, write_report
from inferaligner.eval.runner import agreement, evaluate
from inferaligner.eval.tasks import Task, file_task
from inferaligner.judges import RefusalJudge
from inferaligner.prompts import builtin_prompts
from inferaligner.settings import AlignerSettings

HARMFUL = builtin_prompts("harmful", "calibration")[:3]
BENIGN = builtin_prompts("everyday", "calibration")[:3]


def tiny_tasks() -> list[Task]:
    return [
        Task("harmful", "harmful", HARMFUL, max_new_tokens=6),
        Task("harmless", "benign", BENIGN, max_new_tokens=6),
        Task("utility", "utility", ["Say 7.", "Say 8."], [7, 8], parse=lambda t: 7, max_new_tokens=4),
        Task("choice", "utility", ["Pick one.", "Pick again."], ["yes", "no"], choices=("yes", "no")),
    ]


def test_generation_cache_resumes_after_an_interruption(tmp_path, monkeypatch) -> None:
    aligner = make_aligner()
    cache = tmp_path / "c.jsonl"
    first = generate_cached(aligner, HARMFUL + BENIGN, cache, max_new_tokens=5, batch_size=2, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # two whole rows and a torn one
    calls = []
    original = aligner.complete
    monkeypatch.setattr(
        aligner, "complete", lambda prompts, **kw: calls.append(len(prompts)) or original(prompts, **kw)
    )
    again = generate_cached(aligner, HARMFUL + BENIGN, cache, max_new_tokens=5, batch_size=2, progress=False)
    assert sum(calls) == 4  # only the missing rows were generated
    assert [c.text for c in again] == [c.text for c in first]
    assert [c.gate.as_dict() for c in again] == [c.gate.as_dict() for c in first]  # scores are stored rounded


def test_gated_completions_reuse_unfired_rows(tmp_path) -> None:
    aligner = make_aligner()
    prompts = HARMFUL + BENIGN
    off = make_aligner(mode="off")
    plain = generate_cached(off, prompts, None, max_new_tokens=5, progress=False)
    result = gated_completions(aligner, prompts, plain, tmp_path / "g.jsonl", max_new_tokens=5, progress=False)
    decisions = gate_all(aligner, prompts)
    for got, base, decision in zip(result, plain, decisions, strict=True):
        assert got.gate.fired == decision.fired
        if not decision.fired:
            assert got.text == base.text and not got.intervened
        else:
            assert got.intervened


def test_choose_picks_by_likelihood_and_simple_mode_refuses() -> None:
    aligner = make_aligner(mode="off")
    picks, gates = choose(aligner, HARMFUL + BENIGN, ("yes", "no"))
    assert set(picks) <= {"yes", "no"} and len(gates) == 6
    simple = make_aligner(mode="simple")
    picks, gates = choose(simple, HARMFUL + BENIGN, ("yes", "no"))
    assert [p is None for p in picks] == [g.fired for g in gates]


def test_choice_scores_equal_the_log_likelihood_of_each_unpadded_sequence() -> None:
    import torch

    from inferaligner.prompts import format_chat

    aligner = make_aligner(mode="off")
    tok, choices = aligner.tokenizer, ("yes", "no way at all", "maybe so")  # choices of different token lengths
    scores, _ = choice_scores(aligner, HARMFUL[:2] + BENIGN[:1], choices, batch_size=2)
    for prompt, row in zip(HARMFUL[:2] + BENIGN[:1], scores, strict=True):
        head = tok(format_chat(tok, prompt), add_special_tokens=False)["input_ids"]
        for choice, score in zip(choices, row, strict=True):
            tail = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = aligner.model(input_ids=torch.tensor([head + tail])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(head) - 1 : -1], dim=-1)
            assert abs(score - float(logprobs.gather(1, torch.tensor(tail)[:, None]).sum())) < 1e-3


def test_prompt_defences_wrap_queries() -> None:
    assert SELF_REMINDER.wrap("q").startswith("q\n\n") and SELF_REMINDER.suffix in SELF_REMINDER.wrap("q")
    assert GOAL_PRIORITY.wrap("q") == "q" and "Example 2" in GOAL_PRIORITY.system


def test_evaluate_writes_results_table_and_plots(tmp_path) -> None:
    base = make_aligner()
    methods = build_methods(
        ["target", "self-reminder", "inferaligner", "simple", "always"],
        base.model,
        base.tokenizer,
        base.target_vectors,
        base.aligned_vectors,
        AlignerSettings(alpha=8.0, steer_layers=(1, 2)),
    )
    for method in methods:
        if method.aligner.gate is not None:
            method.aligner.gate = base.gate
    results = evaluate(methods, tiny_tasks(), tmp_path, [RefusalJudge()], batch_size=4, progress=False)
    metrics = results["methods"]
    assert set(metrics) == {"target", "self-reminder", "inferaligner", "simple", "always"}
    assert 0 <= metrics["target"]["harmful"]["asr[refusal-phrases-v3]"] <= 1
    assert metrics["simple"]["harmful"]["refusal[refusal-phrases-v3]"] == metrics["simple"]["harmful"]["gate_fire_rate"]
    assert metrics["always"]["harmless"]["intervened"] == 1.0
    harmful = metrics["target"]["harmful"]
    outcomes = [harmful[f"{kind}[refusal-phrases-v3]"] for kind in ("refusal", "content", "degenerate")]
    assert (
        sum(outcomes) == pytest.approx(1.0)
        and harmful["degenerate[refusal-phrases-v3]"] <= harmful["asr[refusal-phrases-v3]"]
    )
    assert metrics["target"]["utility"]["accuracy"] == 0.5
    assert "accuracy" in metrics["inferaligner"]["choice"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["run"]["judges"] == ["refusal-phrases-v3"] and saved["run"]["versions"]["torch"]
    rows = [json.loads(line) for line in (tmp_path / "completions" / "inferaligner--harmful.jsonl").open()]
    assert len(rows) == 3 and {"prompt", "completion", "gate", "verdicts"} <= set(rows[0])
    write_report(results, tmp_path, "tiny")
    table = (tmp_path / "table.md").read_text()
    assert "+ InferAligner" in table and "XSTest" in table
    roc = saved["gate_roc"]
    assert set(roc["fired"]) >= {"harmful", "harmless"} and "harmful vs harmless" in roc["auroc"]
    assert roc["fired"]["harmful"] == pytest.approx(metrics["inferaligner"]["harmful"]["gate_fire_rate"], abs=1e-4)
    assert "| harmful vs harmless |" in table and (tmp_path / "gate_roc.png").is_file()
    samples = (tmp_path / "samples.md").read_text()
    assert "## + InferAligner: harmful" in samples and samples.count("- [") == 3 * 5  # 3 prompts x 5 methods
    for image in ("asr.png", "over_refusal.png"):
        assert (tmp_path / image).stat().st_size > 1000


def test_tables() -> None:
    results = {
        "labels": {"target": "T"},
        "methods": {
            "target": {
                "harmful": {"asr[j]": 0.5, "refusal[j]": 0.5, "content[j]": 0.375, "degenerate[j]": 0.125},
                "jailbreak": {"asr[j]": 0.25},
                "utility": {"accuracy": 0.9},
                "xstest": {"refusal[j]": 0.1, "gate_fire_rate": 0.2},
                "harmless": {"refusal[j]": 0.0},
            }
        },
    }
    assert "| T | 50.0 / 25.0 / 90.0 |" in safety_table({"d": results}, "j")
    assert "| T | 10.0 | 20.0 | 0.0 | – |" in over_refusal_table(results, "j")
    assert "| T | 50.0 / 37.5 / 12.5 | – / – / – |" in outcome_table({"d": results}, "j")


def _run(domain: str, methods: dict[str, float]) -> dict:
    """A results.json as `evaluate` writes it, with one harmful ASR per method."""
    return {
        "labels": {m: m.upper() for m in methods},
        "methods": {m: {"harmful": {"asr[j]": v}} for m, v in methods.items()},
        "run": {"judges": ["j"], "seconds": 12.0, "domain": domain},
    }


def test_eval_report_joins_domains_and_keeps_every_method(tmp_path, capsys) -> None:
    from inferaligner.cli import main

    for domain, methods in (("math", {"target": 1.0, "inferaligner": 0.1}), ("fin", {"target": 0.5, "sft": 0.2})):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "results.json").write_text(json.dumps(_run(domain, methods)))
    saved = tmp_path / "math" / "completions"  # a run from before the outcome metrics: read from its verdicts
    saved.mkdir()
    answers = [
        ("", False, "degenerate"),
        ("I won't kill no law. " * 8, True, "'i won't'"),
        ("Sure: step 1", False, "x"),
        ("I can't help with that.", True, "'i can't'"),
    ]
    verdicts = [
        {"completion": text, "verdicts": {"j": {"refused": refused, "reason": reason}}}
        for text, refused, reason in answers
    ]
    (saved / "target--harmful.jsonl").write_text("".join(json.dumps(row) + "\n" for row in verdicts))
    out = tmp_path / "table.md"
    assert main(["eval-report", str(tmp_path / "math"), str(tmp_path / "fin"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "| method | math: ASR / jailbreak ASR / accuracy | fin: ASR / jailbreak ASR / accuracy |" in printed
    assert "| SFT | – / – / – | 20.0 / – / – |" in printed  # a method run on one domain only
    assert "| INFERALIGNER | 10.0 / – / – | – / – / – |" in printed
    assert "math 12 s, fin 12 s" in printed
    assert "| TARGET | 25.0 / 25.0 / 50.0 | – / – / – | – / – / – | – / – / – |" in printed  # the loop is no refusal


def test_eval_report_names_a_folder_without_results(tmp_path, capsys) -> None:
    from inferaligner.cli import main

    assert main(["eval-report", str(tmp_path)]) == 2
    assert "no results.json in" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"accuracy": 0.5}')
    assert main(["eval-report", str(tmp_path)]) == 2
    assert "is not an `inferaligner eval` results file" in capsys.readouterr().err


def test_outcomes_split_answers_into_refusal_content_and_degenerate() -> None:
    from inferaligner.judges import RefusalJudge, outcome_shares

    loop = "I won't kill off no law. " * 10
    texts = [
        "no no no no no no no no no no",
        "Sure, here is how: first, gather the tools.",
        "I can't help with that.",
        loop,
    ]
    shares = outcome_shares(RefusalJudge()(texts, texts), texts)
    assert shares == {"refusal": 0.25, "content": 0.25, "degenerate": 0.5}


def test_agreement() -> None:
    from inferaligner.judges import Verdict

    a = [Verdict(True, "", "a"), Verdict(False, "", "a"), Verdict(True, "", "a")]
    b = [Verdict(True, "", "b"), Verdict(True, "", "b"), Verdict(False, "", "b", parsed=False)]
    assert agreement({"a": a, "b": b}) == 0.5 and agreement({"a": a}) is None


def test_task_errors(tmp_path) -> None:
    with pytest.raises(PromptError, match="has no prompts"):
        Task("t", "harmful", [])
    with pytest.raises(PromptError, match="2 prompts but 1 answers"):
        Task("t", "utility", ["a", "b"], [1])
    data = tmp_path / "u.csv"
    data.write_text("question,gold\nWhat is 2+2?,4\n")
    with pytest.raises(PromptError, match="needs --answer-column"):
        file_task("u", "utility", data, "question")
    with pytest.raises(PromptError, match="no column 'answer'; its columns are: question, gold"):
        file_task("u", "utility", data, "question", "answer")
    task = file_task("u", "utility", data, "question", "gold")
    assert task.prompts == ["What is 2+2?"] and task.answers == ["4"] and task.parse("4.\nmore") == "4"
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(PromptError, match="holds no prompts"):
        file_task("h", "harmful", empty)


def test_default_tasks_on_the_shared_data(data_dir) -> None:
    tasks = task_module.default_tasks("arithmetic", limit=20)
    assert [t.name for t in tasks] == ["harmful", "jailbreak", "xstest", "harmless", "utility"]
    assert all(len(t.prompts) <= 20 for t in tasks) and len(tasks[1].prompts) == 20
    jailbreak = task_module.jailbreak_task()
    assert len(jailbreak.prompts) == 500 and len({o["template"] for o in jailbreak.meta["origin"]}) == 10
    assert {t["kind"] for t in jailbreak.meta["templates"]} == {
        "role-play",
        "attention shifting",
        "privilege escalation",
    }
    finance = task_module.finance_task(limit=10)
    assert finance.choices == ("negative", "neutral", "positive") and len(finance.answers) == 10


def test_methods_need_their_models() -> None:
    base = make_aligner()
    with pytest.raises(Exception, match="--model-safety-sft"):
        build_methods(
            ["safety-sft"],
            base.model,
            base.tokenizer,
            base.target_vectors,
            base.aligned_vectors,
            AlignerSettings(alpha=1.0, steer_layers=(1,)),
        )
    extra = {"safety-sft": (tiny_model("llama"), tiny_tokenizer())}
    methods = build_methods(
        ["inferaligner", "safety-sft"],
        base.model,
        base.tokenizer,
        base.target_vectors,
        base.aligned_vectors,
        AlignerSettings(alpha=1.0, steer_layers=(1,)),
        extra_models=extra,
    )
    assert [m.name for m in methods] == ["target", "inferaligner", "safety-sft"]
    assert methods[1].gated and not methods[2].gated
    settings = AlignerSettings(alpha=1.0, steer_layers=(1,))
    with pytest.raises(Exception, match="--aligned-model"):
        build_methods(
            ["aligned-answers"], base.model, base.tokenizer, base.target_vectors, base.aligned_vectors, settings
        )
    extra = {"aligned": (tiny_model("llama", seed=1), tiny_tokenizer())}
    answers = build_methods(
        ["aligned-answers"],
        base.model,
        base.tokenizer,
        base.target_vectors,
        base.aligned_vectors,
        settings,
        extra_models=extra,
    )[1]
    assert answers.gated and answers.aligner.settings.mode.value == "aligned"


def test_a_new_gate_reuses_the_cached_answers_and_reports_its_own_decisions(tmp_path, monkeypatch) -> None:
    prompts = HARMFUL + BENIGN
    off, gated = make_aligner(mode="off"), make_aligner()
    target_cache, acted_cache = tmp_path / "target.jsonl", tmp_path / "acted.jsonl"
    plain = generate_cached(off, prompts, target_cache, max_new_tokens=5, progress=False)
    first = gated_completions(gated, prompts, plain, acted_cache, max_new_tokens=5, progress=False)
    assert any(c.intervened for c in first)
    everything = gated.variant(gate_bias=1e6)  # another gate: it fires on every prompt
    everything_off = everything.variant(mode="off", alpha=2.5)  # and another strength: no matter when off
    calls: list[int] = []
    for aligner in (everything_off, everything):
        original = aligner.complete

        def counted(ps: list[str], original=original, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(ps))
            return original(ps, **kw)

        monkeypatch.setattr(aligner, "complete", counted)
    again = generate_cached(everything_off, prompts, target_cache, max_new_tokens=5, progress=False)
    assert [c.text for c in again] == [c.text for c in plain] and all(c.gate.fired for c in again)
    both = gated_completions(everything, prompts, again, acted_cache, max_new_tokens=5, progress=False)
    assert all(c.gate.fired and c.intervened for c in both)
    assert sum(calls) == sum(not c.intervened for c in first)  # only the rows no earlier gate acted on
    assert [c.text for c, f in zip(both, first, strict=True) if f.intervened] == [c.text for c in first if c.intervened]


def test_the_cache_key_names_the_steering_vectors_and_the_loop_stop() -> None:
    from dataclasses import replace

    from inferaligner.aligner import InferAligner
    from inferaligner.eval.generation import settings_key

    aligner = make_aligner()
    other_vectors = replace(aligner.aligned_vectors, directions=-aligner.aligned_vectors.directions)
    refitted = InferAligner(
        aligner.model,
        aligner.tokenizer,
        target_vectors=aligner.target_vectors,
        aligned_vectors=other_vectors,
        settings=aligner.settings,
    )
    key = settings_key(aligner, 8)
    assert settings_key(refitted, 8) != key  # new vectors: their answers are not reused
    assert settings_key(aligner.variant(loop_span=0), 8) != key
    plain = refitted.variant(mode="off", loop_span=0)  # the target's own answers: neither matters
    assert settings_key(aligner.variant(mode="off"), 8, gate=False) == settings_key(plain, 8, gate=False)


def test_rows_a_plan_chose_are_generated_as_it_says_whatever_the_gate_reads_then() -> None:
    from inferaligner.plan import Action, Plan, RowPlan

    aligner = make_aligner()
    prompts = HARMFUL + BENIGN
    decisions = gate_all(aligner, prompts)
    steer_all = Plan(tuple(RowPlan(Action.STEER, d) for d in decisions))
    forced = generate_cached(aligner, prompts, None, max_new_tokens=5, progress=False, plan=steer_all)
    always = generate_cached(aligner.variant(mode="always"), prompts, None, max_new_tokens=5, progress=False)
    assert all(c.intervened for c in forced) and [c.text for c in forced] == [c.text for c in always]
    with pytest.raises(Exception, match="A plan for 6 rows was given for 2 prompts"):
        aligner.complete(prompts[:2], max_new_tokens=2, plan=steer_all)
