from __future__ import annotations

import pytest
import torch

from inferaligner.errors import InferAlignerError
from inferaligner.gate import (
    Gate,
    auroc,
    calibrate_bias,
    calibrate_bias_tpr,
    choose_gate_layer,
    choose_steer_layers,
    layer_metrics,
    macro_auroc,
    midpoint_bias,
)


def test_gate_scores_and_decisions() -> None:
    gate = Gate(direction=torch.tensor([1.0, 0.0]), bias=-1.0, layer=3)
    decisions = gate.decide(torch.tensor([[3.0, 5.0], [0.5, -2.0]]))
    assert [d.fired for d in decisions] == [True, False]
    assert decisions[0].score == pytest.approx(2.0) and decisions[0].layer == 3
    assert decisions[1].as_dict() == {"fired": False, "score": -0.5, "layer": 3}


def test_layer_metrics_on_separable_and_mixed_layers() -> None:
    harmful = torch.tensor([[2.0, 0.0], [3.0, 1.0], [4.0, -1.0]])
    harmless = torch.tensor([[-2.0, 0.5], [-3.0, 0.0], [-1.0, 1.0]])
    bias = midpoint_bias(harmful, harmless)
    metrics = layer_metrics(harmful, harmless, bias)
    assert metrics.accuracy[0] == 1.0 and metrics.auroc[0] == 1.0 and metrics.fpr[0] == 0.0
    assert metrics.accuracy[1] < 1.0 and metrics.separation[0] > metrics.separation[1]


def test_auroc_matches_pairwise_counting() -> None:
    generator = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(40, 1, generator=generator) + 1, torch.randn(30, 1, generator=generator)
    pos[0, 0] = neg[0, 0]  # one tie
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos[:, 0] for n in neg[:, 0]]
    assert float(auroc(pos, neg)[0]) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.1, 0.5])
def test_calibrated_bias_keeps_the_false_positive_rate(fpr: float) -> None:
    harmless = torch.randn(200, generator=torch.Generator().manual_seed(1))
    bias = calibrate_bias(harmless, fpr)
    allowed = int(fpr * 200)
    assert int((harmless + bias > 0).sum()) <= allowed
    assert int((harmless + bias + 1e-4 > 0).sum()) == allowed + 1  # the bias is the tightest such value


def test_calibration_input_errors() -> None:
    with pytest.raises(InferAlignerError, match=r"\[0, 1\)"):
        calibrate_bias(torch.zeros(3), 1.5)
    with pytest.raises(InferAlignerError, match="at least one harmless"):
        calibrate_bias(torch.zeros(0), 0.1)


def test_layer_choice() -> None:
    accuracy = torch.tensor([0.5, 0.9, 1.0, 1.0, 0.95, 1.0])
    separation = torch.tensor([0.1, 1.0, 2.0, 3.0, 2.5, 1.0])
    assert choose_gate_layer(accuracy, separation) == 3
    assert choose_steer_layers(accuracy, accuracy, 0.9) == [1, 2, 3, 4]
    assert choose_steer_layers(accuracy, torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])) == [1, 3, 4]
    weak = torch.tensor([0.5, 0.7, 0.8, 0.78, 0.74, 0.9])  # never 0.9 inside: within 0.05 of the best (0.8)
    assert choose_steer_layers(weak, weak) == [2, 3]
    with pytest.raises(InferAlignerError, match="pass the steering layers by hand"):
        choose_steer_layers(accuracy, torch.full((6,), 0.5))


def test_pool_reads_the_last_real_token_or_the_mean_under_either_padding() -> None:
    from inferaligner.gate import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, 3])
    torch.testing.assert_close(pool(hidden, right, "last")[0], hidden[0, 2])
    torch.testing.assert_close(pool(hidden, left, "mean")[0], hidden[0, 1:].mean(0))
    torch.testing.assert_close(pool(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, left, "mean")[1], hidden[1].mean(0))
    with pytest.raises(InferAlignerError, match="Unknown pooling 'max'"):
        pool(hidden, left, "max")


def test_probe_separates_and_search_picks_the_informative_layer() -> None:
    from inferaligner.gate import fit_probe, search_probe

    generator = torch.Generator().manual_seed(0)

    def sample(shift: float, n: int) -> torch.Tensor:
        acts = torch.randn(n, 4, 8, generator=generator)
        acts[:, 2, 5] += shift  # only layer 2, feature 5 tells the classes apart
        return acts

    harmful, harmless, cal_harmful, cal_harmless = sample(4.0, 40), sample(-4.0, 40), sample(4.0, 30), sample(-4.0, 30)
    direction, bias = fit_probe(harmful[:, 2], harmless[:, 2])
    assert int(direction.abs().argmax()) == 5
    assert bool((cal_harmful[:, 2] @ direction + bias > 0).all())
    assert bool((cal_harmless[:, 2] @ direction + bias < 0).all())
    search = search_probe(harmful, harmless, cal_harmful, cal_harmless)
    assert search.layer == 2 and float(search.auroc[2]) == 1.0 and float(search.auroc[1]) < 0.8
    strict = search_probe(harmful, harmless, cal_harmful, cal_harmless, tpr=1.0)
    assert bool((cal_harmful[:, 2] @ strict.direction + strict.bias > 0).all())
    with pytest.raises(InferAlignerError, match="needs harmful and harmless"):
        fit_probe(harmful[:0, 2], harmless[:, 2])


def test_tpr_bias_fires_on_the_asked_fraction_of_harmful_prompts() -> None:
    scores = torch.arange(20, dtype=torch.float32)  # 0 .. 19
    for tpr, fired in ((1.0, 20), (0.95, 19), (0.9, 18), (0.5, 10), (0.04, 1)):
        assert int((scores + calibrate_bias_tpr(scores, tpr) > 0).sum()) == fired
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0])
    assert int((ties + calibrate_bias_tpr(ties, 0.5) > 0).sum()) == 3  # a tie at the threshold fires together
    with pytest.raises(InferAlignerError, match=r"true-positive rate must be in \(0, 1\]"):
        calibrate_bias_tpr(scores, 0.0)
    with pytest.raises(InferAlignerError, match="at least one harmful"):
        calibrate_bias_tpr(torch.zeros(0), 0.9)


def test_macro_auroc_weighs_each_harmless_group_alike() -> None:
    harmful = torch.tensor([2.0, 3.0, 4.0, 5.0])
    easy, hard = torch.full((96,), -10.0), torch.tensor([2.5, 3.5, 4.5, 5.5])
    both = torch.cat([easy, hard])
    pooled = macro_auroc(harmful, both)
    grouped = macro_auroc(harmful, both, [96, 4])
    assert pooled > 0.95 and grouped == pytest.approx((1.0 + float(auroc(harmful[:, None], hard[:, None]))) / 2)
    with pytest.raises(InferAlignerError, match="must be non-empty and cover all 100"):
        macro_auroc(harmful, both, [96, 3])


def test_the_probe_is_chosen_by_its_worst_ranked_groups_not_the_crowd() -> None:
    from inferaligner.gate import search_probe

    generator = torch.Generator().manual_seed(1)

    def sample(n: int, shift_1: float, shift_2: float) -> torch.Tensor:
        acts = torch.randn(n, 4, 6, generator=generator)
        acts[:, 1, 0] += shift_1
        acts[:, 2, 0] += shift_2
        return acts

    # Layer 1 separates harmful prompts from the many everyday ones perfectly but puts the few look-alikes among
    # them; layer 2 separates both groups, each imperfectly. Pooled, layer 1 ranks best; per group, layer 2.
    harmful, cal_harmful = sample(40, 6.0, 1.0), sample(30, 6.0, 1.0)
    everyday, cal_everyday = sample(120, -6.0, -1.0), sample(90, -6.0, -1.0)
    lookalike, cal_lookalike = sample(40, 6.0, -1.0), sample(6, 6.0, -1.0)
    safe, cal_safe = torch.cat([everyday, lookalike]), torch.cat([cal_everyday, cal_lookalike])
    assert search_probe(harmful, safe, cal_harmful, cal_safe).layer == 1
    assert search_probe(harmful, safe, cal_harmful, cal_safe, groups=[90, 6]).layer == 2


def _turn_gate(margin: float = 0.0) -> Gate:
    return Gate(direction=torch.tensor([1.0, 0.0]), bias=-1.0, layer=2, pooling="turns", earlier_margin=margin)


def test_a_turns_gate_fires_when_any_turn_does_earlier_ones_past_the_margin() -> None:
    harmful_first = torch.tensor([[2.5, 0.0], [0.0, 0.0]])  # an earlier turn at +1.5, the request at -1
    harmful_last = harmful_first.flip(0)
    assert _turn_gate(margin=1.0).decide_turns([harmful_first])[0].fired  # 1.5 - 1.0 > 0
    blocked = _turn_gate(margin=2.0).decide_turns([harmful_first])[0]
    assert not blocked.fired and blocked.score == pytest.approx(-0.5)  # 1.5 - 2.0, above the request's -1
    assert _turn_gate(margin=2.0).decide_turns([harmful_last])[0].fired  # the request is held to the plain bias


def test_a_turns_gate_fails_closed_and_passes_an_empty_prompt() -> None:
    broken, empty = _turn_gate().decide_turns([torch.tensor([[float("nan"), 0.0]]), torch.zeros(0, 2)])
    assert broken.fired and broken.as_dict()["score"] is None
    assert not empty.fired
