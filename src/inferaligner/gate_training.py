"""Teaching a `"turns"` gate: labelled prompts, each read as a lone request, a probe chosen on held-out ones.

The prompts (`gate_prompts`): the built-in gate sets, the deployment's own domain prompts, and, where the data
folder is present, the public training-only sets and everyday Alpaca instructions (`inferaligner.data`). A share
of the outside prompts is copied into the forms requests take in the field (`inferaligner.framings`): persuasive
framings and task forms ("Write a guide on ...": harmful and benign alike, so the form is not the signal), raw
completion frames, and, for harmful ones only, role-play frames that try to switch the model's rules off (an
attack whatever it asks). Composed system messages join the harmless side: the
gate reads a system message too, and one that only sets a persona or claims the rules are off is no request.

Each prompt is read the way the gate reads a turn at inference (`inferaligner.reader`: alone, after the chat
template's opening). A class-balanced logistic probe is fitted per layer and regularisation strength on the
`extraction` part; the one that ranks the `calibration` part best is kept (`pairwise_auroc`: the AUROC of each
harmful source against each harmless source, averaged over the pairs); a small MLP at that layer (`fit_mlp_head`)
takes its place when it ranks the calibration part better still. Its bias makes it fire on a chosen share of the
calibration harmful prompts (or on at most a share of the harmless ones), and the margin an earlier turn must clear
makes it fire on at most `EARLIER_FPR` of the calibration harmless prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.data import LabelledPrompt, alpaca_training, data_dir, split_of, training_prompts
from inferaligner.errors import PromptError
from inferaligner.framings import completion_frame, frame, system_messages, task_form
from inferaligner.gate import (
    DEFAULT_GATE_TPR,
    PROBE_L2,
    GateHead,
    auroc,
    balanced_weights,
    calibrate_bias,
    calibrate_bias_tpr,
    fit_weighted_probe,
)
from inferaligner.models import decoder_layers
from inferaligner.prompts import (
    GATE_HARMFUL,
    GATE_HARMLESS,
    OVERRIDE_FRAMES,
    ROLEPLAY_FRAMES,
    builtin_records,
    chat_token_ids,
)
from inferaligner.reader import RequestReader
from inferaligner.turns import prompt_turns
from inferaligner.vectors import MLP, PROBE, GateSpec, SafetyVectors, data_hash

BUILTIN_WEIGHT = 3.0
"""How much each built-in prompt counts against one public prompt: the built-in sets are written to contrast
harmful requests with benign ones on the same topics, the public sets are broad and noisier."""
SHARES = {"framed": 0.15, "task": 0.2, "completion": 0.05, "override": 0.1}
"""The share of outside prompts copied into each form (override frames: harmful prompts only)."""
ALPACA_PROMPTS = 4000
SYSTEM_MESSAGES = 400
EARLIER_FPR = 0.005
"""An earlier turn (or the system message) fires only past a margin at which at most this share of the calibration
harmless prompts would fire: the slips of a long benign conversation do not add up."""


def gate_prompts(
    domain: Sequence[tuple[str, str]] = (),
    *,
    public: bool = True,
    alpaca: int = ALPACA_PROMPTS,
    seed: int = 0,
) -> list[LabelledPrompt]:
    """The labelled prompts a turns gate is built from, each in its part (`extraction` or `calibration`).

    `domain` holds the deployment's own benign prompts with their part. `public` adds the training-only sets and
    Alpaca instructions from the data folder (an error naming the folder if it is missing)."""
    prompts = [
        LabelledPrompt(record.prompt, kind in GATE_HARMFUL, f"builtin:{kind}", record.split, BUILTIN_WEIGHT)
        for kind in (*GATE_HARMFUL, *GATE_HARMLESS)
        for record in builtin_records(kind)
    ]
    prompts += [LabelledPrompt(text, False, "domain", split, BUILTIN_WEIGHT) for text, split in domain]
    rng = random.Random(seed)
    systems = system_messages(rng, SYSTEM_MESSAGES)
    prompts += [LabelledPrompt(text, False, "system", split_of(text)) for text in dict.fromkeys(systems)]
    if public:
        data_dir()  # a clear error, before anything else, when the folder is missing
        outside = training_prompts() + alpaca_training(alpaca, seed)
        prompts += outside + _copies(outside, rng)
    return prompts


def domain_parts(prompts: Sequence[str], per_part: int) -> list[tuple[str, str]]:
    """Up to `per_part` domain prompts for each part: the first ones for extraction, the last ones for calibration
    (fewer each when there are not twice as many)."""
    per_part = min(per_part, len(prompts) // 2)
    if per_part == 0:
        return []
    return [(p, "extraction") for p in prompts[:per_part]] + [(p, "calibration") for p in prompts[-per_part:]]


def _copies(prompts: Sequence[LabelledPrompt], rng: random.Random) -> list[LabelledPrompt]:
    """Copies of a share of `prompts` in the forms requests take: framed, as a task, in a completion frame, and
    (harmful ones) inside a frame that tries to switch the rules off."""
    overrides = [ROLEPLAY_FRAMES[i] for i in OVERRIDE_FRAMES]
    copies = []
    for p in prompts:
        if rng.random() < SHARES["framed"]:
            copies.append(LabelledPrompt(frame(p.prompt, rng), p.harmful, f"{p.source}+framed", p.split, p.weight))
        if rng.random() < SHARES["task"]:
            copies.append(LabelledPrompt(task_form(p.prompt, rng), p.harmful, f"{p.source}+task", p.split, p.weight))
        if rng.random() < SHARES["completion"]:
            text = completion_frame(p.prompt, rng)
            copies.append(LabelledPrompt(text, p.harmful, f"{p.source}+completion", p.split, p.weight))
        if p.harmful and rng.random() < SHARES["override"]:
            text = rng.choice(overrides).format(prompt=p.prompt)
            copies.append(LabelledPrompt(text, True, f"{p.source}+override", p.split, p.weight))
    return copies


def turn_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`text`'s tokens as a user turn's own tokens: what the gate reads of a one-turn chat holding it."""
    turns = prompt_turns(tokenizer, chat_token_ids(tokenizer, [{"role": "user", "content": text}]))
    return turns[-1] if turns else []


def candidate_layers(num_layers: int) -> list[int]:
    """The layers a turns gate may read: the middle half of the model (the read costs blocks 0 to the layer)."""
    return list(range(max(1, num_layers // 4), max(2, (3 * num_layers) // 4 + 1)))


@dataclass(frozen=True)
class GateFit:
    """The chosen turns gate and how it was chosen."""

    layer: int
    direction: torch.Tensor | None  # a probe's; None for an MLP gate
    bias: float
    l2: float
    earlier_margin: float
    rule: str  # "tpr", "fpr" or "probe" (the probe's own fitted bias)
    target: float
    auroc: dict[int, float]  # each searched layer's best calibration score (macro AUROC)
    fire_rates: dict[str, float] = field(default_factory=dict)  # per calibration group, at the chosen bias
    counts: dict[str, int] = field(default_factory=dict)  # prompts per part and label
    head: GateHead | None = None  # the MLP, when it ranks the calibration part better than the probe
    linear_auroc: float = 0.0  # the best probe's calibration score (the MLP's is `auroc[layer]` when it won)


def read_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Each text read as a lone request at `layers`: [texts, layers, hidden] (float32, CPU)."""
    from tqdm.auto import tqdm

    reader = RequestReader(model, tokenizer, decoder_layers(model), list(layers), cache_size=0)
    turns = [turn_ids(tokenizer, text) for text in texts]
    if not all(turns):
        empty = next(text for text, turn in zip(texts, turns, strict=True) if not turn)
        raise PromptError(f"A gate prompt has no text to read: {empty!r}.")
    order = sorted(range(len(texts)), key=lambda i: len(turns[i]))
    out = torch.zeros(len(texts), len(reader.read_layers), int(model.config.get_text_config().hidden_size))
    step = 256
    for start in tqdm(range(0, len(order), step), desc="reading gate prompts", disable=not progress, unit="batch"):
        chunk = order[start : start + step]
        read = reader.read([[turns[i]] for i in chunk])
        for index, features in zip(chunk, read, strict=True):
            out[index] = features[0] if features.ndim == 3 else features
    return out


def pairwise_auroc(scores: torch.Tensor, groups: dict[tuple[bool, str], list[int]]) -> float:
    """The AUROC of each harmful group against each harmless group (`groups`: (harmful, source) -> indices),
    averaged over every pair: no source weighs more for being large, an easy one cannot hide a hard one."""
    positives = [index for (is_harmful, _), index in groups.items() if is_harmful]
    negatives = [index for (is_harmful, _), index in groups.items() if not is_harmful]
    pairs = [float(auroc(scores[p][:, None], scores[n][:, None])) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


MLP_UNITS = 64
MLP_EPOCHS = 30


def fit_mlp_head(
    features: torch.Tensor,
    harmful: torch.Tensor,
    weights: torch.Tensor,
    fit: torch.Tensor,
    groups: dict[tuple[bool, str], list[int]],
    *,
    units: int = MLP_UNITS,
    seed: int = 0,
) -> tuple[GateHead, float, float]:
    """A small MLP (hidden -> `units` -> 1, GELU) on features [prompts, hidden]: trained on the `fit` rows (class-
    balanced on top of `weights`, AdamW, dropout 0.1), scored every five epochs on the calibration rows
    (`pairwise_auroc` over `groups`); the best epoch is kept. Returns the head (standardisation folded in), its
    calibration score and its own output bias. Deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = harmful.float()
    weights = balanced_weights(weights, harmful, fit)
    mean, scale = features[fit].mean(0), features[fit].std(0) + 1e-4
    standard = (features - mean) / scale
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(features.shape[1], units), nn.GELU(), nn.Dropout(0.1), nn.Linear(units, 1))
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    rows = torch.nonzero(fit).flatten()
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for epoch in range(MLP_EPOCHS):
            net.train()
            order = rows[torch.randperm(len(rows), generator=generator)]
            for start in range(0, len(order), 128):
                batch = order[start : start + 128]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    net(standard[batch])[:, 0], labels[batch], reduction="none"
                )
                optimiser.zero_grad()
                (loss * weights[batch]).mean().backward()
                optimiser.step()
            if epoch % 5 == 4:
                net.eval()
                with torch.no_grad():
                    score = pairwise_auroc(net(standard)[:, 0], groups)
                if best is None or score > best[0] + 1e-9:
                    best = (score, {k: v.clone() for k, v in net.state_dict().items()})
    assert best is not None
    state = best[1]
    hidden_weight = state["0.weight"] / scale  # standardisation folded into the first layer
    hidden_bias = state["0.bias"] - hidden_weight @ mean
    return GateHead(hidden_weight, hidden_bias, state["3.weight"][0].clone()), best[0], float(state["3.bias"][0])


def _labels(prompts: Sequence[LabelledPrompt], tpr: float | None, fpr: float | None) -> tuple[torch.Tensor, ...]:
    """Which prompts are harmful and which belong to the fit part; raises when a part lacks a class."""
    if tpr is not None and fpr is not None:
        raise PromptError("Set the gate's bias by a true-positive rate or by a false-positive rate, not both.")
    harmful = torch.tensor([p.harmful for p in prompts])
    fit = torch.tensor([p.split == "extraction" for p in prompts])
    for part, mask in (("extraction", fit), ("calibration", ~fit)):
        if not bool((harmful & mask).any()) or not bool((~harmful & mask).any()):
            raise PromptError(f"The gate's {part} part needs harmful and harmless prompts.")
    return harmful, fit


def _search_probes(
    features: torch.Tensor,
    harmful: torch.Tensor,
    weights: torch.Tensor,
    fit: torch.Tensor,
    groups: dict[tuple[bool, str], list[int]],
    layers: Sequence[int],
    l2_values: Sequence[float],
) -> tuple[dict[int, float], tuple[float, int, torch.Tensor, float, float]]:
    """A probe per layer and L2 on the fit part; each layer's best calibration AUROC, and the best probe overall
    (AUROC, layer, direction, L2, its own bias)."""
    scores_by_layer: dict[int, float] = {}
    best: tuple[float, int, torch.Tensor, float, float] | None = None
    for position, layer in enumerate(layers):
        for l2 in sorted(l2_values, reverse=True):
            direction, own = fit_weighted_probe(features[fit, position], harmful[fit], weights[fit], l2)
            macro = pairwise_auroc(features[:, position] @ direction, groups)
            scores_by_layer[layer] = max(scores_by_layer.get(layer, 0.0), macro)
            if best is None or macro > best[0] + 1e-9:
                best = (macro, layer, direction, l2, own)
    assert best is not None
    return scores_by_layer, best


def _bias(
    harmful_cal: torch.Tensor, harmless_cal: torch.Tensor, own: float, tpr: float | None, fpr: float | None
) -> tuple[float, str, float]:
    """The gate's bias, the rule that set it and its target rate."""
    if tpr is not None:
        return calibrate_bias_tpr(harmful_cal, tpr), "tpr", tpr
    if fpr is not None:
        return calibrate_bias(harmless_cal, fpr), "fpr", fpr
    return own, "probe", 0.0


def fit_turns_gate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[LabelledPrompt],
    *,
    layers: Sequence[int] | None = None,
    l2_values: Sequence[float] = PROBE_L2,
    tpr: float | None = DEFAULT_GATE_TPR,
    fpr: float | None = None,
    earlier_fpr: float = EARLIER_FPR,
    features: torch.Tensor | None = None,
    mlp: bool = True,
    progress: bool = True,
) -> GateFit:
    """Fit and choose a turns gate on `prompts` (see the module's text); the bias by `tpr` or `fpr`, or, with
    neither, the probe's own. `features` ([prompts, layers, hidden], as `read_prompts` gives them for `layers`) skips
    the read."""
    harmful, fit = _labels(prompts, tpr, fpr)
    layers = list(layers) if layers is not None else candidate_layers(len(decoder_layers(model)))
    if features is None:
        features = read_prompts(model, tokenizer, [p.prompt for p in prompts], layers, progress=progress)
    weights = torch.tensor([p.weight for p in prompts])
    groups: dict[tuple[bool, str], list[int]] = defaultdict(list)
    for index, p in enumerate(prompts):
        if p.split == "calibration":
            groups[(p.harmful, p.source)].append(index)
    cal_harmful = torch.nonzero(harmful & ~fit).flatten()
    scores_by_layer, (linear_auroc, layer, direction, l2, own) = _search_probes(
        features, harmful, weights, fit, groups, layers, l2_values
    )
    position = layers.index(layer)
    head = None
    if mlp:  # a small MLP at the chosen layer, kept if it ranks the calibration part better than the probe
        candidate, mlp_auroc, mlp_own = fit_mlp_head(features[:, position], harmful, weights, fit, groups)
        if mlp_auroc > linear_auroc + 1e-9:
            head, own = candidate, mlp_own
            scores_by_layer[layer] = mlp_auroc
    scores = head(features[:, position]) if head is not None else features[:, position] @ direction
    harmless_cal = scores[~harmful & ~fit]
    bias, rule, target = _bias(scores[cal_harmful], harmless_cal, own, tpr, fpr)
    # An earlier turn fires when its score clears `margin` more: at the bias `calibrate_bias` sets for `earlier_fpr`.
    margin = max(0.0, bias - calibrate_bias(harmless_cal, earlier_fpr))
    fired = scores + bias > 0
    rates = {
        source: round(float(fired[index].float().mean()), 4)
        for (is_harmful, source), index in sorted(groups.items())
        if not is_harmful
    }
    rates["harmful"] = round(float(fired[cal_harmful].float().mean()), 4)
    parts = {"extraction": fit, "calibration": ~fit}
    labels = {"harmful": harmful, "harmless": ~harmful}
    counts = {
        f"{part}.{label}": int((mask & kind).sum()) for part, mask in parts.items() for label, kind in labels.items()
    }
    return GateFit(
        layer,
        None if head is not None else direction,
        bias,
        l2,
        margin,
        rule,
        target,
        scores_by_layer,
        rates,
        counts,
        head,
        linear_auroc,
    )


def with_turns_gate(vectors: SafetyVectors, fit: GateFit, prompts: Sequence[LabelledPrompt]) -> SafetyVectors:
    """`vectors` (the target's own, from `extract_safety_vectors`) with `fit` as their stored gate, its data named
    and each searched layer's calibration score kept (`turns.calibration_auroc`)."""
    sources = sorted({p.source.split("+")[0] for p in prompts})
    data = (
        f"{len(prompts)} prompts ({fit.counts}) from {', '.join(sources)}; "
        f"hash {data_hash([p.prompt for p in prompts], [str(p.harmful) for p in prompts])}"
    )
    kind = MLP if fit.head is not None else PROBE
    spec = GateSpec(
        fit.layer,
        fit.bias,
        fit.rule,
        fit.target if fit.rule == "fpr" else None,
        kind,
        "turns",
        fit.target if fit.rule == "tpr" else None,
        fit.earlier_margin,
        data,
    )
    scores = torch.zeros(vectors.num_layers)
    for layer, value in fit.auroc.items():
        scores[layer] = value
    gated = vectors.with_gate(spec, fit.direction, fit.head)
    return replace(gated, metrics={**gated.metrics, "turns.calibration_auroc": scores})


def target_vectors(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    domain: Sequence[str] = (),
    *,
    public: bool = True,
    gate_tpr: float | None = DEFAULT_GATE_TPR,
    gate_fpr: float | None = None,
    per_part: int | None = None,
    progress: bool = True,
) -> SafetyVectors:
    """A target's own vectors with a turns gate, in one call: the mean differences of the built-in gate sets (the
    domain's prompts on the harmless side) and a turns gate built from `gate_prompts` (half of the domain's prompts,
    or `per_part` of them, teach it, half check it)."""
    from inferaligner.prompts import gate_group_sizes, gate_sets
    from inferaligner.vectors import extract_safety_vectors

    per_part = len(domain) // 2 if per_part is None else per_part
    parts = domain_parts(domain, per_part)
    extra = {split: [text for text, part in parts if part == split] for split in ("extraction", "calibration")}

    def sets(split: str) -> tuple[list[str], list[str]]:
        harmful, harmless = gate_sets(split)  # type: ignore[arg-type]
        return harmful, harmless + extra[split]

    groups = gate_group_sizes("calibration") + ([len(extra["calibration"])] if extra["calibration"] else [])
    vectors = extract_safety_vectors(
        model,
        tokenizer,
        *sets("extraction"),
        calibration=sets("calibration"),
        harmless_groups=groups,
        progress=progress,
    )
    prompts = gate_prompts(parts, public=public)
    fit = fit_turns_gate(
        model, tokenizer, prompts, tpr=None if gate_fpr is not None else gate_tpr, fpr=gate_fpr, progress=progress
    )
    return with_turns_gate(vectors, fit, prompts)
