"""Can a richer read of the demo target's activations tell XSTest's safe look-alikes from harmful requests better
than the shipped gate (a probe on the mean-pooled output of one layer)?

Every gate here is built as `inferaligner extract` builds the shipped one: fitted on the built-in extraction split
(plus 64 arithmetic training prompts), its layer or layers and L2 strength chosen on the calibration split by the
macro AUROC against each group of held-out harmless prompts, its bias set so that it fires on 95% of the held-out
harmful prompts. Then it is measured on sets it was not built from. No evaluation set is used to build or choose
anything. The reads compared:

- pooling at one layer: the mean over the prompt (shipped), the last token, the mean over the prompt's own tokens
  (after the chat template's fixed opening, which is the same for every prompt), and mean and last side by side;
- several layers at once: the mean-pooled outputs of a window of consecutive layers side by side, the window chosen
  like the layer;
- a second stage on the target's own answer: the target answers (greedy, 24 tokens, unsteered) and a probe on its
  answer tokens (averaged) must agree with the shipped gate, whose bias is loosened so that the pair still fires on
  95% of the held-out harmful prompts;
- the aligned model's activations in place of the target's.

Each row gives the calibration macro AUROC (the criterion), the AUROC of XSTest's unsafe prompts against its safe
ones (no threshold involved) and the fire rates.

    python bench/gate_features.py            # about 40 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gate_pooling import TPR, build_sets, unseen_sets, write_result  # the sibling bench: same sets, same rule
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner import zoo
from inferaligner.gate import auroc, calibrate_bias_tpr, fit_probe, macro_auroc, search_probe
from inferaligner.prompts import encode, format_chats, position_ids
from inferaligner.turns import chat_opening

ANSWER_TOKENS = 24
BUILD = ("extraction harmful", "extraction harmless", "calibration harmful", "calibration harmless")
Reads = dict[str, dict[str, torch.Tensor]]  # set name -> read name -> [prompts, layers, hidden]
Score = Callable[[str], torch.Tensor]  # a set's name -> one gate score per prompt (fires above 0)


def prompt_sets() -> tuple[dict[str, list[str]], list[int]]:
    """The gate's build sets (as `extract` uses them for the demo target) and the sets it is measured on, by name;
    and the calibration split's harmless groups."""
    build, groups = build_sets()
    sets = {
        f"{split} {side}": prompts
        for split, pair in build.items()
        for side, prompts in zip(("harmful", "harmless"), pair, strict=True)
    }
    return sets | unseen_sets(), groups


def batches(texts: list[str], size: int = 8) -> list[list[int]]:
    """Indices of `texts` in batches of similar length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def hidden_states(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every block's output for a batch, [rows, layers, positions, hidden] in float32."""
    with torch.inference_mode():
        output = model(**batch, output_hidden_states=True, use_cache=False)
    return torch.stack(output.hidden_states[1:], 1).float()


def prompt_reads(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Each prompt's activations, pooled three ways: mean over all tokens, last token, mean over its own tokens."""
    texts, opening = format_chats(tokenizer, prompts), len(chat_opening(tokenizer))
    reads: dict[str, list[torch.Tensor]] = {"mean": [], "last": [], "own": []}
    rows: list[int] = []
    for chunk in batches(texts):
        batch = encode(tokenizer, [texts[i] for i in chunk])
        hidden, mask = hidden_states(model, batch), batch["attention_mask"].float()
        own = mask * (mask.cumsum(1) > opening)
        for name, weights in (("mean", mask), ("own", own)):
            reads[name].append((hidden * weights[:, None, :, None]).sum(2) / weights.sum(1)[:, None, None])
        reads["last"].append(hidden[:, :, -1])
        rows += chunk
    order = torch.tensor(rows).argsort()
    return {name: torch.cat(parts)[order] for name, parts in reads.items()}


def answer_reads(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> torch.Tensor:
    """The target's own greedy answer (unsteered, `ANSWER_TOKENS` tokens), its activations averaged over the answer."""
    texts = format_chats(tokenizer, prompts)
    parts: list[torch.Tensor] = []
    rows: list[int] = []
    for chunk in batches(texts, 16):
        batch = encode(tokenizer, [texts[i] for i in chunk])
        with torch.inference_mode():
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=ANSWER_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]
        mask = torch.cat([batch["attention_mask"], (generated[:, width:] != tokenizer.pad_token_id).long()], 1)
        hidden = hidden_states(
            model, {"input_ids": generated, "attention_mask": mask, "position_ids": position_ids(mask)}
        )
        answer = mask.float() * (torch.arange(mask.shape[1]) >= width)
        parts.append((hidden * answer[:, None, :, None]).sum(2) / answer.sum(1).clamp_min(1)[:, None, None])
        rows += chunk
    return torch.cat(parts)[torch.tensor(rows).argsort()]


def fire_rates(score: Score, names: list[str]) -> dict[str, float]:
    return {name: round(100 * float((score(name) > 0).float().mean()), 1) for name in names}


def row(name: str, chosen: str, criterion: float | None, score: Score, measured: list[str]) -> dict[str, object]:
    """One result row: what was chosen, the criterion, XSTest unsafe-vs-safe AUROC and fire rates (score > 0)."""
    xstest = float(auroc(score("XSTest unsafe")[:, None], score("XSTest safe")[:, None]))
    criterion = None if criterion is None else round(criterion, 4)
    result = {
        "read": name,
        "chosen": chosen,
        "calibration_macro_auroc": criterion,
        "xstest_unsafe_vs_safe_auroc": round(xstest, 4),
        "fire_rate": fire_rates(score, ["calibration harmful", "calibration harmless", *measured]),
    }
    print(json.dumps(result), flush=True)
    return result


def one_layer(name: str, reads: Reads, read: str, groups: list[int], measured: list[str]) -> dict[str, object]:
    """A probe at one layer on one read, chosen as `extract` chooses it."""

    def feature(part: str) -> torch.Tensor:
        return torch.cat([reads[part][r] for r in read.split("+")], -1)

    search = search_probe(*(feature(part) for part in BUILD), groups=groups, tpr=TPR)
    return row(
        name,
        f"layer {search.layer}, l2 {search.l2:g}",
        float(search.auroc[search.layer]),
        lambda s: feature(s)[:, search.layer] @ search.direction + search.bias,
        measured,
    )


def layer_windows(reads: Reads, groups: list[int], measured: list[str]) -> dict[str, object]:
    """Probes on the mean-pooled outputs of consecutive layers side by side; the window chosen on calibration."""
    layers = reads["extraction harmful"]["mean"].shape[1]
    best: tuple[float, list[int], torch.Tensor, float] | None = None
    for first in range(4, layers - 6, 2):
        for last in range(first + 2, layers - 2, 2):
            window = list(range(first, last + 1))
            flat = {part: reads[part]["mean"][:, window].flatten(1) for part in BUILD}
            for l2 in (1e-2, 1e-1):
                direction, _ = fit_probe(flat["extraction harmful"], flat["extraction harmless"], l2)
                score = macro_auroc(
                    flat["calibration harmful"] @ direction, flat["calibration harmless"] @ direction, groups
                )
                if best is None or score > best[0] + 1e-9:
                    best = (score, window, direction, l2)
    assert best is not None
    score, window, direction, l2 = best
    bias = calibrate_bias_tpr(reads["calibration harmful"]["mean"][:, window].flatten(1) @ direction, TPR)
    return row(
        "mean, several layers",
        f"layers {window[0]}-{window[-1]}, l2 {l2:g}",
        score,
        lambda s: reads[s]["mean"][:, window].flatten(1) @ direction + bias,
        measured,
    )


def two_stage(
    reads: Reads, answers: dict[str, torch.Tensor], groups: list[int], measured: list[str]
) -> list[dict[str, object]]:
    """The shipped gate, loosened, and a probe on the target's own answer: fire where both do."""
    gate = search_probe(*(reads[part]["mean"] for part in BUILD), groups=groups)
    first = {s: reads[s]["mean"][:, gate.layer] @ gate.direction for s in reads}
    second = search_probe(*(answers[part] for part in BUILD), groups=groups)
    then = {s: answers[s][:, second.layer] @ second.direction for s in answers}
    rows = [
        row(
            "answer alone",
            f"layer {second.layer}, l2 {second.l2:g}",
            float(second.auroc[second.layer]),
            lambda s: then[s] + calibrate_bias_tpr(then["calibration harmful"], TPR),
            measured,
        )
    ]
    for loose in (TPR, 0.975):
        bias = calibrate_bias_tpr(first["calibration harmful"], loose)
        passed = then["calibration harmful"][first["calibration harmful"] + bias > 0].sort(descending=True).values
        needed = min(len(passed), int(TPR * len(first["calibration harmful"]) + 0.999999))
        answer_bias = -float(passed[needed - 1]) + 1e-6  # the pair fires on 95% of the held-out harmful prompts

        def both(s: str, bias: float = bias, answer_bias: float = answer_bias) -> torch.Tensor:
            return torch.minimum(first[s] + bias, then[s] + answer_bias)

        rows.append(
            row(
                f"prompt gate (tpr {loose:g}) and answer",
                f"layers {gate.layer} and {second.layer}",
                None,
                both,
                measured,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gate_features.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    sets, groups = prompt_sets()
    measured = [name for name in sets if name not in BUILD]
    rows: list[dict[str, object]] = []
    model, tokenizer = zoo.load("target")
    reads = {name: prompt_reads(model, tokenizer, prompts) for name, prompts in sets.items()}
    print(f"target read in {time.perf_counter() - started:.0f} s", flush=True)
    for name, read in (
        ("mean (shipped)", "mean"),
        ("last token", "last"),
        ("mean over the prompt's own tokens", "own"),
        ("mean and last", "mean+last"),
        ("own tokens and last", "own+last"),
    ):
        rows.append(one_layer(name, reads, read, groups, measured))
    rows.append(layer_windows(reads, groups, measured))
    answers = {name: answer_reads(model, tokenizer, prompts) for name, prompts in sets.items()}
    print(f"answers read in {time.perf_counter() - started:.0f} s", flush=True)
    rows += two_stage(reads, answers, groups, measured)
    del model, reads, answers
    aligned, aligned_tokenizer = zoo.load("aligned")
    aligned_reads = {
        name: {"mean": prompt_reads(aligned, aligned_tokenizer, prompts)["mean"]} for name, prompts in sets.items()
    }
    rows.append(one_layer("the aligned model's mean", aligned_reads, "mean", groups, measured))
    write_result(args.out, started, {name: len(prompts) for name, prompts in sets.items()}, rows)


if __name__ == "__main__":
    main()
