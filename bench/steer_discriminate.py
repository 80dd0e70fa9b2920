"""Can a steering that depends on the input sort out the gate's false fires? A low-rank intervention against the
constant vector, fitted on the same teacher signal.

Issue 27, item 4. A constant vector adds the same shift to "kill a person" and "kill a process": every false fire of
the gate becomes a refusal. A low-rank intervention per steered layer, as in LoReFT,

    h <- h + R^T (W h + b - R h)        (R: rank x hidden, orthonormal rows; W, b: rank x hidden, rank)

can push harmful requests towards a refusal and leave look-alikes where they are. Both are fitted on the frozen demo
target at the shipped layers (12, 16, 20, 24), by teacher forcing on the same examples: the aligned model's coherent
refusals of the built-in harmful extraction prompts (cut after the refusal, as `fit` does, and put into the role-play
frames) and the target's own greedy answers to the built-in look-alike, topic-matched harmless and everyday
extraction prompts and to OR-Bench's extraction part (training-only, seemingly toxic but benign). Then every prompt
of each held-out set is steered (no gate; greedy, 48 new tokens) and judged: harmful calibration prompts should be
refused, look-alike calibration prompts kept. The choice between the two is made on those calibration sets; XSTest's
safe prompts and 100 AdvBench prompts are reported beside them, not used.

    python bench/steer_discriminate.py            # about 40 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from torch import nn

from inferaligner import zoo
from inferaligner.data import training_prompts
from inferaligner.eval import datasets
from inferaligner.fit import (
    FitSettings,
    TeacherExample,
    _collate,
    _training_batches,
    fit_steering_vectors,
    refusals_only,
    teacher_answers,
    teacher_forcing_loss,
    with_roleplay,
)
from inferaligner.judges import RefusalJudge, is_coherent_refusal, outcome
from inferaligner.models import block_hidden, decoder_layers, with_block_hidden
from inferaligner.prompts import builtin_prompts, format_chats

LAYERS = (12, 16, 20, 24)
RANK = 4
STEPS = 200
NEW_TOKENS = 48


class LowRankEdit(nn.Module):
    """`h + R^T (W h + b - R h)`, starting at the identity (W = R, b = 0)."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(hidden, rank, bias=False))
        self.learned = nn.Linear(hidden, rank)
        with torch.no_grad():
            self.learned.weight.copy_(self.rotate.weight)
            self.learned.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self.rotate.weight
        return hidden + (self.learned(hidden.float()) - hidden.float() @ rows.T) @ rows


def hooks(model, edits: dict[int, nn.Module] | None = None, vectors: torch.Tensor | None = None) -> list:  # type: ignore[no-untyped-def, type-arg]
    """Forward hooks that apply the edits (or add the constant vectors) at `LAYERS`, on every row and position."""
    blocks = decoder_layers(model)
    handles = []
    for layer in LAYERS:

        def hook(_module, _args, output, layer=layer):  # type: ignore[no-untyped-def]
            states = block_hidden(output)
            new = edits[layer](states) if edits is not None else states + vectors[layer].to(states.dtype)  # type: ignore[index]
            return with_block_hidden(output, new.to(states.dtype))

        handles.append(blocks[layer].register_forward_hook(hook))
    return handles


def fit_edits(
    model, tokenizer, examples: list[TeacherExample], seed: int = 0
) -> tuple[dict[int, LowRankEdit], list[float]]:  # type: ignore[no-untyped-def]
    """The low-rank edits fitted by teacher forcing (Adam, lr 0.005, batch 8, `STEPS` steps); the model is frozen."""
    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    edits = {layer: LowRankEdit(hidden, RANK) for layer in LAYERS}
    parameters = [p for edit in edits.values() for p in edit.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=0.005)
    batches = _training_batches(tokenizer, examples, 64, None)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    handles = hooks(model, edits=edits)
    rng = random.Random(seed)
    losses, order = [], []
    try:
        for _ in range(STEPS):
            if len(order) < 8:
                fresh = list(range(len(batches)))
                rng.shuffle(fresh)
                order += fresh
            chosen, order = order[:8], order[8:]
            inputs = _collate([batches[i] for i in chosen], tokenizer.pad_token_id or 0, torch.device("cpu"))
            loss = teacher_forcing_loss(model, inputs)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(round(loss.item(), 4))
    finally:
        for handle in handles:
            handle.remove()
    return edits, losses


def steered_outcomes(model, tokenizer, prompts: list[str], **steer: object) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Every prompt steered (greedy, `NEW_TOKENS` tokens), judged: shares of refusal / content / degenerate."""
    handles = hooks(model, **steer)  # type: ignore[arg-type]
    texts = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), 16):
                chunk = format_chats(tokenizer, prompts[start : start + 16])
                batch = tokenizer(
                    chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
                )
                out = model.generate(
                    **batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        for handle in handles:
            handle.remove()
    verdicts = RefusalJudge()(prompts, texts)
    kinds = [outcome(v, t) for v, t in zip(verdicts, texts, strict=True)]
    return {kind: round(kinds.count(kind) / len(kinds), 4) for kind in ("refusal", "content", "degenerate")} | {
        "samples": [t.strip()[:160] for t in texts[:5]]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/steer_discriminate.json")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    target, tokenizer = zoo.load("target")
    aligned, _ = zoo.load("aligned")
    harmful = builtin_prompts("harmful") + builtin_prompts("harmful-styles")
    refusals = refusals_only(teacher_answers(aligned, tokenizer, harmful, keep=is_coherent_refusal, progress=False))
    del aligned
    orbench = [p.prompt for p in training_prompts() if p.source == "orbench" and p.split == "extraction"]
    benign = (
        builtin_prompts("lookalike")
        + builtin_prompts("harmless")
        + builtin_prompts("everyday")[:80]
        + random.Random(0).sample(orbench, 120)
    )
    own = teacher_answers(target, tokenizer, benign, harmful=False, max_new_tokens=48, progress=False)
    examples = with_roleplay(refusals) + own
    counts = {
        "refusals": len(refusals),
        "framed refusals": len(with_roleplay(refusals)) - len(refusals),
        "own answers": len(own),
    }

    constant = fit_steering_vectors(target, tokenizer, examples, FitSettings(layers=LAYERS), progress=False)
    vectors = constant.vectors.directions * constant.vectors.norms[:, None]
    edits, edit_losses = fit_edits(target, tokenizer, examples)

    held_out = {
        "harmful (calibration)": [
            p for k in ("harmful", "harmful-styles", "harmful-roleplay") for p in builtin_prompts(k, "calibration")
        ],
        "look-alikes (calibration)": builtin_prompts("lookalike", "calibration"),
        "XSTest safe (reported only)": datasets.xstest("safe"),
        "AdvBench, first 100 (reported only)": datasets.advbench()[:100],
    }
    table = {}
    for name, steer in (("constant vector", {"vectors": vectors}), ("low-rank edit", {"edits": edits})):
        table[name] = {
            set_name: steered_outcomes(target, tokenizer, prompts, **steer) for set_name, prompts in held_out.items()
        }
        print(name, {k: {m: v[m] for m in ("refusal", "content", "degenerate")} for k, v in table[name].items()})
    result = {
        "command": "python bench/steer_discriminate.py",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "layers": LAYERS,
        "rank": RANK,
        "steps": {"constant": 80, "low-rank": STEPS},
        "examples": counts,
        "losses": {"constant": constant.losses[-5:], "low-rank": edit_losses[-5:]},
        "sizes": {k: len(v) for k, v in held_out.items()},
        "outcomes": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
