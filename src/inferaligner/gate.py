"""The guidance gate: does the target's own activation at layer l0 say the request is harmful?

`g = 1 if a_l0(P)·s_l0 + b_l0 > 0`, with `s` the target's unit safety-related vector. The paper's bias is minus
the mean projection of the extraction prompts (the midpoint); `calibrate_bias` instead picks the bias that keeps
the false-positive rate on harmless prompts at a chosen level. Raising the bias makes the gate stricter.

`fit_probe` offers a second way to choose `s` at the same layer: a class-balanced, L2-regularised logistic
regression on the same activations. The gate keeps the paper's form `a·s + b`; only the direction differs.
`calibrate_bias_tpr` sets the bias from the other side: the gate fires on a chosen fraction of held-out harmful
prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inferaligner.errors import InferAlignerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict for one sequence."""

    fired: bool
    score: float
    layer: int

    def as_dict(self) -> dict[str, object]:
        """JSON-ready; a score that is not finite (a broken model or vector) is `None`."""
        score = round(self.score, 4) if math.isfinite(self.score) else None
        return {"fired": self.fired, "score": score, "layer": self.layer}


POOLINGS = ("last", "mean", "turns")
"""How a gate reads the prompt: the last token (the paper), the mean over every token, or each turn on its own, read
as a lone request (`inferaligner.reader`: the mean over the turn's own tokens)."""


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of block outputs [rows, positions, hidden]: the last real token (`"last"`, the paper) or
    the mean over real tokens (`"mean"`); `mask` [rows, positions] marks them (left or right padding alike)."""
    if pooling == "last":
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last.to(hidden.device)]
    if pooling == "mean":
        weights = mask.to(device=hidden.device, dtype=hidden.dtype)[:, :, None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    raise InferAlignerError(f"Unknown pooling '{pooling}': use one of {', '.join(POOLINGS)}.")


@dataclass(frozen=True)
class GateHead:
    """A small MLP on the pooled activation, in place of a probe's direction: `w2 · gelu(W1 a + b1)` (the
    standardisation it was trained with folded into `W1`, `b1`); the gate adds its bias."""

    hidden_weight: torch.Tensor  # [units, hidden]
    hidden_bias: torch.Tensor  # [units]
    output_weight: torch.Tensor  # [units]

    def __call__(self, activations: torch.Tensor) -> torch.Tensor:
        weight = self.hidden_weight.to(device=activations.device, dtype=torch.float32)
        inner = activations.float() @ weight.T + self.hidden_bias.to(device=activations.device, dtype=torch.float32)
        return torch.nn.functional.gelu(inner) @ self.output_weight.to(device=activations.device, dtype=torch.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "hidden_weight": self.hidden_weight,
            "hidden_bias": self.hidden_bias,
            "output_weight": self.output_weight,
        }


@dataclass(frozen=True)
class Gate:
    """A direction (or a small MLP `head`), a bias, the layer whose output they read, and how that output is pooled
    over the prompt.

    A `"turns"` gate scores each turn of a prompt on its own (`decide_turns`) and fires when any turn's score is
    above zero; the turns before the last one (earlier requests, the system message) must clear `earlier_margin`
    more, so the chance slips of a long benign conversation do not add up, while a clearly harmful earlier request
    still counts.
    """

    direction: torch.Tensor | None
    bias: float
    layer: int
    pooling: str = "last"
    earlier_margin: float = 0.0
    head: GateHead | None = None

    def scores(self, activations: torch.Tensor) -> torch.Tensor:
        """`a·s + b` (or `head(a) + b`) for activations of shape [..., hidden] taken at `layer`."""
        if self.head is not None:
            return self.head(activations) + self.bias
        assert self.direction is not None
        direction = self.direction.to(device=activations.device, dtype=torch.float32)
        return activations.float() @ direction + self.bias

    def decide(self, activations: torch.Tensor) -> list[GateDecision]:
        """One decision per row of [rows, hidden] activations. A score that is not finite fires the gate (fail
        closed: a broken activation must not switch the safety layer off) and is logged."""
        return self._decisions(self.scores(activations).tolist())

    def decide_turns(self, turns: Sequence[torch.Tensor]) -> list[GateDecision]:
        """One decision per prompt from its turns' features ([turns, hidden] each, in order, the request last): the
        highest turn score, the earlier turns' lowered by `earlier_margin`. A score that is not finite anywhere
        fires; a prompt with no text to read at all (only template tokens) does not."""
        decisions = []
        for features in turns:
            if len(features) == 0:
                decisions.append(GateDecision(False, float("-inf"), self.layer))
                continue
            each = self.scores(features)
            each[:-1] -= self.earlier_margin
            broken = not bool(torch.isfinite(each).all())
            decisions += self._decisions([float("nan") if broken else float(each.max())])
        return decisions

    def _decisions(self, scores: list[float]) -> list[GateDecision]:
        decisions = []
        for score in scores:
            finite = math.isfinite(score)
            if not finite:
                log.warning("gate score at layer %d is %s: treated as fired", self.layer, score)
            decisions.append(GateDecision(score > 0 or not finite, float(score), self.layer))
        return decisions


@dataclass(frozen=True)
class LayerMetrics:
    """Per-layer quality of a gate direction on labelled prompts (each tensor has one value per layer)."""

    accuracy: torch.Tensor
    tpr: torch.Tensor
    fpr: torch.Tensor
    auroc: torch.Tensor
    separation: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("accuracy", "tpr", "fpr", "auroc", "separation")}


def layer_metrics(harmful: torch.Tensor, harmless: torch.Tensor, bias: torch.Tensor) -> LayerMetrics:
    """Metrics from projections `a·s` of shape [prompts, layers] and a bias per layer.

    `accuracy` is balanced, `(TPR + 1 - FPR) / 2`, so unequal set sizes do not tilt it (with equal sizes it is
    plain accuracy). `separation` is Cohen's d between the two projection distributions: it ranks layers whose
    accuracy ties.
    """
    harmful, harmless = harmful.float(), harmless.float()
    tpr = (harmful + bias > 0).float().mean(0)
    fpr = (harmless + bias > 0).float().mean(0)
    n, m = len(harmful), len(harmless)
    accuracy = (tpr + 1 - fpr) / 2
    pooled = ((harmful.var(0, unbiased=False) * n + harmless.var(0, unbiased=False) * m) / (n + m)).sqrt()
    separation = (harmful.mean(0) - harmless.mean(0)) / pooled.clamp_min(1e-8)
    return LayerMetrics(accuracy, tpr, fpr, auroc(harmful, harmless), separation)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve per column: P(positive > negative), ties counting half."""
    greater = (positive[:, None, :] > negative[None, :, :]).float().mean((0, 1))
    equal = (positive[:, None, :] == negative[None, :, :]).float().mean((0, 1))
    return greater + 0.5 * equal


def midpoint_bias(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """The paper's bias per layer: minus the midpoint of the two classes' mean projections.

    With equally many harmful and harmless prompts this is minus the mean over all of them, as in the paper.
    """
    return -(harmful.float().mean(0) + harmless.float().mean(0)) / 2


def calibrate_bias(harmless: torch.Tensor, fpr: float) -> float:
    """The bias at which at most a fraction `fpr` of these harmless projections (one layer) fire the gate."""
    if not 0 <= fpr < 1:
        raise InferAlignerError(f"The target false-positive rate must be in [0, 1), got {fpr}.")
    if harmless.numel() == 0:
        raise InferAlignerError("Calibrating the gate needs at least one harmless prompt.")
    ordered = harmless.float().sort(descending=True).values
    allowed = int(fpr * len(ordered))  # how many harmless prompts may fire
    return -float(ordered[min(allowed, len(ordered) - 1)])


def fit_probe(harmful: torch.Tensor, harmless: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, float]:
    """A logistic-regression gate on activations [prompts, hidden] of one layer: `(direction, bias)` such that
    `a·direction + bias > 0` means harmful (`fit_weighted_probe`, every prompt weighing the same)."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise InferAlignerError("A probe gate needs harmful and harmless prompts.")
    labels = torch.cat([torch.ones(len(harmful), dtype=torch.bool), torch.zeros(len(harmless), dtype=torch.bool)])
    return fit_weighted_probe(torch.cat([harmful, harmless]), labels, None, l2)


def balanced_weights(weights: torch.Tensor, harmful: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """`weights` with the harmful prompts' scaled so the two classes weigh the same in total (counted over the rows
    `among` marks, or all)."""
    labels = harmful.float() if among is None else (harmful & among).float()
    others = (~harmful).float() if among is None else (~harmful & among).float()
    balance = (weights * others).sum() / (weights * labels).sum()
    return weights * torch.where(harmful, balance, torch.ones(()))


def fit_weighted_probe(
    features: torch.Tensor, harmful: torch.Tensor, weights: torch.Tensor | None = None, l2: float = 1e-3
) -> tuple[torch.Tensor, float]:
    """A logistic-regression gate on features [prompts, hidden] labelled `harmful` [prompts] (bool), each prompt
    weighing its `weights` entry: `(direction, bias)` with `a·direction + bias > 0` for harmful. The two classes
    weigh the same in total, whatever their sizes; features are standardised while fitting (then folded back
    into the direction and bias); L2-regularised; deterministic (L-BFGS from zero)."""
    labels = harmful.float()
    if not 0 < float(labels.sum()) < len(labels):
        raise InferAlignerError("A probe gate needs harmful and harmless prompts.")
    weights = balanced_weights(torch.ones(len(labels)) if weights is None else weights.float(), harmful)
    features = features.float()
    mean, scale = features.mean(0), features.std(0) + 1e-4
    standard = (features - mean) / scale
    weight = torch.zeros(features.shape[1], requires_grad=True)
    offset = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, offset], max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = standard @ weight + offset
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weights)
        value = value + l2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    direction = weight.detach() / scale
    return direction, float(offset.detach() - direction @ mean)


DEFAULT_GATE_TPR = 0.95
"""The default gate sensitivity: the bias at which the gate fires on 95% of the held-out harmful calibration
prompts (the issue's bar for harmful prompts from sets the gate was not built from)."""


def calibrate_bias_tpr(harmful: torch.Tensor, tpr: float) -> float:
    """The bias at which at least a fraction `tpr` of these harmful projections (one layer) fire the gate."""
    if not 0 < tpr <= 1:
        raise InferAlignerError(f"The target true-positive rate must be in (0, 1], got {tpr}.")
    if harmful.numel() == 0:
        raise InferAlignerError("Calibrating the gate for a true-positive rate needs at least one harmful prompt.")
    ordered = harmful.float().sort().values
    missed = int((1 - tpr) * len(ordered) + 1e-9)  # how many harmful prompts may stay below the threshold
    first = float(ordered[missed])  # the lowest score that must fire
    below = float(ordered[missed - 1]) if missed else first - 1.0
    if below >= first:  # a tie across the threshold: fire on both
        below = first - 1e-6 * max(1.0, abs(first))
    return -(below + first) / 2  # halfway between the last prompt let through and the first that fires


def macro_auroc(harmful: torch.Tensor, harmless: torch.Tensor, groups: Sequence[int] | None = None) -> float:
    """AUROC of harmful against harmless scores, averaged over the groups of harmless prompts (`groups`: how many
    consecutive harmless scores each group holds; one group if `None`), so a small, hard group of look-alikes
    counts as much as a large, easy one."""
    sizes = list(groups) if groups else [len(harmless)]
    if sum(sizes) != len(harmless) or min(sizes) <= 0:
        raise InferAlignerError(
            f"The harmless groups ({sizes}) must be non-empty and cover all {len(harmless)} harmless prompts."
        )
    parts = harmless.split(sizes)
    return sum(float(auroc(harmful[:, None], part[:, None])) for part in parts) / len(parts)


@dataclass(frozen=True)
class ProbeSearch:
    """The probe chosen over layers and regularisation strengths, its bias, and each layer's best calibration
    score (macro AUROC)."""

    layer: int
    direction: torch.Tensor
    bias: float
    l2: float
    auroc: torch.Tensor


PROBE_L2 = (1e-3, 1e-2, 1e-1)


def search_probe(
    harmful: torch.Tensor,
    harmless: torch.Tensor,
    cal_harmful: torch.Tensor,
    cal_harmless: torch.Tensor,
    l2_values: tuple[float, ...] = PROBE_L2,
    *,
    groups: Sequence[int] | None = None,
    tpr: float | None = None,
) -> ProbeSearch:
    """Fit a probe per inner layer and L2 strength on activations [prompts, layers, hidden]; keep the one that ranks
    the held-out calibration prompts best: the highest AUROC of harmful against each group of harmless prompts,
    averaged over the groups (`macro_auroc`; ties: the earlier layer, then the stronger regularisation).

    The bias is the probe's own, or, with `tpr`, the one at which that fraction of calibration harmful prompts fire.
    """
    layers = harmful.shape[1]
    scores = torch.zeros(layers)
    best: tuple[float, int, torch.Tensor, float, float] | None = None
    for layer in range(1, layers - 1) if layers > 2 else range(layers):
        for l2 in sorted(l2_values, reverse=True):
            direction, bias = fit_probe(harmful[:, layer], harmless[:, layer], l2)
            score = macro_auroc(
                cal_harmful[:, layer].float() @ direction, cal_harmless[:, layer].float() @ direction, groups
            )
            scores[layer] = max(float(scores[layer]), score)
            if best is None or score > best[0] + 1e-9:
                best = (score, layer, direction, bias, l2)
    assert best is not None
    _, layer, direction, bias, l2 = best
    if tpr is not None:
        bias = calibrate_bias_tpr(cal_harmful[:, layer].float() @ direction, tpr)
    return ProbeSearch(layer, direction, bias, l2, scores)


def choose_gate_layer(accuracy: torch.Tensor, separation: torch.Tensor) -> int:
    """The most accurate layer; ties go to the layer that separates the classes most widely."""
    best = accuracy.max()
    candidates = torch.nonzero(accuracy >= best - 1e-6).flatten()
    return int(candidates[separation[candidates].argmax()])


def choose_steer_layers(
    target_accuracy: torch.Tensor, aligned_accuracy: torch.Tensor, min_accuracy: float = 0.9
) -> list[int]:
    """Layers where both the target and the aligned model separate harmful from harmless (the paper's `L_G`).

    A layer qualifies when both accuracies reach `min_accuracy`, or, for models that never do, come within 0.05
    of the best layer's (the lower of the two models). The first and last block are excluded.
    """
    both = torch.minimum(target_accuracy, aligned_accuracy)
    last = len(both) - 1
    inner = both[1:last] if last > 1 else both
    threshold = min(min_accuracy, float(inner.max()) - 0.05) - 1e-6
    layers = [i for i, value in enumerate(both.tolist()) if value >= threshold and 0 < i < last]
    if not layers or float(inner.max()) < 0.6:
        raise InferAlignerError(
            "No layer separates harmful from harmless prompts in both models (best accuracy "
            f"{float(inner.max()):.2f}); pass the steering layers by hand (--layers) or extract vectors from more "
            "prompts."
        )
    return layers
