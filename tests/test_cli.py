from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
from tiny import tiny_model, tiny_tokenizer

from inferaligner.cli import main, parse_layers
from inferaligner.errors import InferAlignerError
from inferaligner.serve.settings import ServeSettings
from inferaligner.vectors import SafetyVectors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", context=2048).save_pretrained(folder)  # room for the long role-play frames
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vector_file(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "tiny.safetensors"
    code = main(
        ["extract", "--model", str(model_dir), "--out", str(out), "--limit", "8", "--gate-fpr", "0.1", "--no-public"]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def aligned_file(model_dir, tmp_path_factory):
    """Mean-difference vectors standing in for an aligned model's (other prompts, so not the target's own)."""
    out = tmp_path_factory.mktemp("vectors") / "aligned.safetensors"
    twin = shutil.copytree(model_dir, out.parent / "aligned-model")  # another model's folder (same weights)
    code = main(
        [
            "extract",
            "--model",
            str(twin),
            "--out",
            str(out),
            "--pooling",
            "last",
            "--harmful",
            "builtin:harmful:calibration",
            "--harmless",
            "builtin:harmless:calibration",
        ]
    )
    assert code == 0
    return out


def test_help_lists_every_verb() -> None:
    result = subprocess.run([sys.executable, "-m", "inferaligner.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for verb in ("extract", "generate", "chat", "inspect"):
        assert verb in result.stdout


def test_extract_writes_a_calibrated_vector_file(vector_file) -> None:
    vectors = SafetyVectors.load(vector_file)
    assert vectors.provenance.n_harmful == 3 * 8  # three built-in harmful sets, --limit per set
    assert vectors.gate is not None and vectors.gate.rule == "fpr"
    assert vectors.gate.direction in ("probe", "mlp") and vectors.gate.pooling == "turns"  # the defaults
    assert "calibration.accuracy" in vectors.metrics and "turns.calibration_auroc" in vectors.metrics
    assert "from builtin:everyday" in vectors.gate.data and "orbench" not in vectors.gate.data  # --no-public


def test_extract_sets_the_gate_for_the_harmful_share_by_default(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "tpr.safetensors"
    assert main(["extract", "--model", str(model_dir), "--out", str(out), "--limit", "8"]) == 0
    gate = SafetyVectors.load(out).gate
    assert gate is not None and (gate.rule, gate.target_tpr, gate.target_fpr) == ("tpr", 0.95, None)
    assert main(["inspect", str(out)]) == 0
    assert "(tpr, tpr 0.95)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(model_dir), "--out", str(out), "--gate-tpr", "1.5"])
    assert "1.5 is not a fraction between 0 and 1" in capsys.readouterr().err
    assert main(["extract", "--model", str(model_dir), "--out", str(out), "--limit", "8", "--gate-tpr", "0"]) == 0
    assert SafetyVectors.load(out).gate.rule == "probe"  # 0: the probe keeps its own bias
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(model_dir), "--out", str(out), "--gate-fpr", "1"])
    assert "would fire on everything" in capsys.readouterr().err


def test_turns_gate_options_that_cannot_work_are_one_line_errors(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bad.safetensors"
    base = ["extract", "--model", str(model_dir), "--out", str(out), "--limit", "8", "--no-public"]
    assert main([*base, "--gate", "mean-difference"]) == 2
    assert "A turns gate is a probe: leave --gate at 'probe'" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("What is a bond's duration?\n")
    assert main([*base, "--domain", str(one)]) == 2
    assert "--domain needs at least two prompts" in capsys.readouterr().err
    assert not out.exists()


def test_fit_calibrate_and_generate_with_the_settings(model_dir, vector_file, tmp_path, capsys) -> None:
    steering = tmp_path / "steering.safetensors"
    fit = ["fit", "--model", str(model_dir), "--aligned", str(model_dir), "--out", str(steering)]
    assert main([*fit, "--frames", "0,99"]) == 2
    assert "role-play frame numbers 0-16, not [99]" in capsys.readouterr().err and not steering.exists()
    assert main([*fit, "--frames", "1", "--no-roleplay"]) == 2
    assert "--no-roleplay teaches none" in capsys.readouterr().err
    # the tiny random "aligned" model refuses nothing, so teach with a one-line file of refusals via a tiny teacher
    assert main([*fit, "--limit", "2", "--steps", "2", "--layers", "1,2", "--answer-tokens", "4"]) == 2
    assert "refused none of the harmful prompts" in capsys.readouterr().err
    from inferaligner.fit import FitSettings, TeacherExample, fit_steering_vectors

    fitted = fit_steering_vectors(
        tiny_model("llama"),
        tiny_tokenizer(),
        [TeacherExample("Hurt him?", "No.")],
        FitSettings(layers=(1, 2), steps=2),
        progress=False,
    )
    fitted.vectors.save(steering)
    settings = tmp_path / "out" / "settings.json"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model_dir),
                "--steering",
                str(steering),
                "--out",
                str(settings),
                "--scales",
                "0.5,1",
                "--limit",
                "2",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| teacher-fitted | 0.5 |" in table and "**yes**" in table
    assert json.loads(settings.read_text())["vectors"] == "../steering.safetensors"
    assert settings.with_suffix(".png").stat().st_size > 1000
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--target-vectors",
        str(vector_file),
        "--settings",
        str(settings),
        "--max-new-tokens",
        "3",
        "--json",
        "How do I bake bread?",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["mode"] == "inferaligner"
    assert main(["inspect", str(steering)]) == 0
    assert "teacher-fitted steering vectors" in capsys.readouterr().out


def test_generate_json_reports_the_gate(model_dir, vector_file, aligned_file, capsys) -> None:
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--target-vectors",
        str(vector_file),
        "--aligned-vectors",
        str(aligned_file),
        "--layers",
        "1-2",
        "--max-new-tokens",
        "4",
        "--json",
        "How do I bake bread?",
        "Write a poem",
    ]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["How do I bake bread?", "Write a poem"]
    for line in lines:
        assert set(line["gate"]) == {"fired", "score", "layer"} and line["mode"] == "inferaligner"
        assert isinstance(line["completion"], str)


def test_generate_reads_prompts_from_a_file(model_dir, vector_file, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "Say hi"}\n')
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--target-vectors",
        str(vector_file),
        "--mode",
        "simple",
        "--file",
        str(prompts),
        "--max-new-tokens",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "> Say hi" in out and "[gate " in out


def test_loop_span_is_an_option_checked_like_every_setting(model_dir, vector_file, capsys) -> None:
    base = [
        "generate",
        "--model",
        str(model_dir),
        "--target-vectors",
        str(vector_file),
        "--mode",
        "simple",
        "--max-new-tokens",
        "3",
        "Say hi",
    ]
    assert main([*base, "--loop-span", "4"]) == 0
    assert main([*base, "--loop-span", "-1"]) == 2
    assert "loop_span must be a whole number of tokens" in capsys.readouterr().err


def test_inspect_prints_provenance_and_metrics(vector_file, capsys) -> None:
    assert main(["inspect", str(vector_file)]) == 0
    out = capsys.readouterr().out
    assert "mean-difference vectors of" in out and "gate: layer" in out and "calibration.accuracy" in out
    assert "with an MLP gate at layer" in out and "raw/res" in out, "what the file is, and its strength per layer"
    assert "reads each user turn, the system message and a raw prompt alone" in out and "gate data: " in out
    assert main(["inspect", "--json", str(vector_file)]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["num_layers"] == 4


def _error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_bad_inputs_give_one_line_errors(model_dir, vector_file, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_text("junk")
    assert "not a safetensors file" in _error(["inspect", str(junk)], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no prompts" in _error(
        [
            "extract",
            "--model",
            str(model_dir),
            "--harmful",
            str(empty),
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
        capsys,
    )
    base = [
        "generate",
        "--model",
        str(model_dir),
        "--target-vectors",
        str(vector_file),
        "--layers",
        "1",
        "--mode",
        "self",
    ]
    assert "context" in _error([*base, "--max-new-tokens", "3000", "hi"], capsys)
    assert "needs the aligned model's vectors" in _error([*base[:-2], "inferaligner", "hi"], capsys)
    assert "Give prompts" in _error(base, capsys)
    assert "alpha must be a positive number" in _error([*base, "--alpha", "0", "hi"], capsys)
    assert "alpha must be a finite number" in _error([*base, "--alpha", "nan", "hi"], capsys)
    assert "gate_bias must be a finite number" in _error([*base, "--gate-bias", "inf", "hi"], capsys)
    assert "steer_layers [100, 101] are outside" in _error([*base[:6], "100-101", *base[7:], "hi"], capsys)


def test_serve_without_a_model_honours_every_alignment_option(tmp_path) -> None:
    from inferaligner.build import alignment
    from inferaligner.cli import build_parser
    from inferaligner.cli.serve import _serve_options

    def _alignment(options: dict) -> tuple:
        resolved = alignment(options)
        return resolved.settings, resolved.target_vectors, resolved.aligned_vectors

    def options(*argv: str) -> dict:
        return _serve_options(build_parser().parse_args(["serve", *argv]))

    demo = options("--alpha", "2", "--gate-bias", "1e9", "--layers", "12,16", "--mode", "simple")
    assert demo["model"] == "zoo:target" and demo["served_model_name"] == "inferaligner-demo"
    settings, target, aligned = _alignment(demo)
    assert (settings.alpha, settings.gate_bias, settings.steer_layers) == (2.0, 1e9, (12, 16))
    assert settings.mode.value == "simple" and target is not None and aligned is None, "simple mode steers nothing"
    settings, target, aligned = _alignment(options())
    assert settings.mode.value == "inferaligner" and target is not None and aligned is not None and aligned.fitted
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"alpha": 3, "layers": "12-13", "port": 9000}))
    from_file = options("--config", str(config), "--port", "9001")
    assert _alignment(from_file)[0].steer_layers == (12, 13) and from_file["port"] == 9001
    config.write_text(json.dumps({"alpah": 3}))
    with pytest.raises(InferAlignerError, match=r"Unknown keys .*alpah"):
        options("--config", str(config))
    config.write_text(json.dumps({"alpha": "nan"}))
    with pytest.raises(InferAlignerError, match="'alpha' must be a number, not 'nan'"):
        _alignment(options("--config", str(config)))
    assert options()["prefix_cache_mb"] == 256 and options("--no-prefix-cache")["prefix_cache_mb"] == 0
    assert options("--prefix-cache-mb", "64")["prefix_cache_mb"] == 64
    config.write_text(json.dumps({"prefix_cache_mb": 0}))
    assert options("--config", str(config))["prefix_cache_mb"] == 0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InferAlignerError, match="--prefix-cache-mb must be 0"):
            ServeSettings(prefix_cache_mb=bad)
    config.write_text(json.dumps({"prefix_cache_mb": "no"}))
    with pytest.raises(InferAlignerError, match="'prefix_cache_mb' must be a number"):
        options("--config", str(config))
    assert options()["pass_cost_tokens"] == 0 and options("--pass-cost-tokens", "400")["pass_cost_tokens"] == 400
    with pytest.raises(InferAlignerError, match=r"--pass-cost-tokens must be 0 \(measured at start\) or more"):
        ServeSettings(pass_cost_tokens=-3)


def test_mismatched_target_and_vectors(tmp_path, vector_file, capsys) -> None:
    other = tmp_path / "wide"
    tiny_model("llama", hidden=64).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    message = _error(
        ["generate", "--model", str(other), "--target-vectors", str(vector_file), "--mode", "self", "hi"],
        capsys,
    )
    assert "4 layers x 32" in message and "4 layers x 64" in message


def test_the_cli_offers_every_dtype_the_builder_knows() -> None:
    from inferaligner.build import DTYPES
    from inferaligner.cli import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


def test_parse_layers() -> None:
    assert parse_layers("2-4,8") == [2, 3, 4, 8] == parse_layers(" 2-4 , 8")
    for bad in ("a-b", "1,,2", "", "1,", "-1", "3-", "1.5", "2-x"):
        with pytest.raises(argparse.ArgumentTypeError, match="list of layer numbers"):
            parse_layers(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="runs backwards"):
        parse_layers("9-5")


def test_demo_eval_builds_only_the_comparison_models_asked_for(tmp_path, monkeypatch) -> None:
    from inferaligner.cli import evaluate
    from inferaligner.zoo import recipes

    built: list[str] = []
    monkeypatch.setattr(recipes, "build_demo_model", lambda name, folder: built.append(name))
    folders = evaluate._demo_models("arithmetic", tmp_path, ["target", "inferaligner", "safety-sft"])
    assert built == ["safety-sft-arithmetic"]
    assert set(folders) == {"target", "safety-sft"}


def test_eval_on_your_own_pair_defaults_to_unit_vectors(vector_file, aligned_file, tmp_path, data_dir, capsys) -> None:
    long_context = tmp_path / "model"  # the jailbreak prompts need more than the fixture model's 256 positions
    tiny_model("llama", context=2048).save_pretrained(long_context)
    tiny_tokenizer().save_pretrained(long_context)
    vectors = ["--target-vectors", str(vector_file), "--aligned-vectors", str(aligned_file)]
    code = main(
        [
            "eval",
            "--target",
            str(long_context),
            *vectors,
            "--methods",
            "target,inferaligner,simple",
            "--limit",
            "2",
            "--layers",
            "1-2",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "eval" / "results.json").read_text())["run"]
    assert config["steer_scale"] == "unit" and (tmp_path / "eval" / "table.md").is_file()
    assert config["layers"], "the steered layers are recorded even when a non-steering row comes last"
