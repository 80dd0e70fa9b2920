from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from inferaligner.errors import VectorMismatchError
from inferaligner.models import block_hidden, decoder_layers
from inferaligner.steer import add_steering

IDS = torch.tensor([[5, 17, 42, 99, 7], [8, 9, 10, 11, 12]])


def _block_outputs(model, layers) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: seen.append(block_hidden(out))) for layer in layers]
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_adds_alpha_theta_to_steered_blocks_only(model_type: str) -> None:
    model = tiny_model(model_type)
    layers = decoder_layers(model)
    directions = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    before = _block_outputs(model, layers)
    with add_steering(layers, directions, [2], alpha=3.0):
        during = _block_outputs(model, layers)
    torch.testing.assert_close(during[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(during[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(during[2], before[2] + 3.0 * directions[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(during[3], before[3])


def test_rows_with_gate_zero_pass_through_bit_for_bit() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    directions = torch.randn(4, 32)
    with torch.no_grad():
        plain = model(IDS).logits
        with add_steering(layers, directions, [0, 1, 2, 3], alpha=4.0, row_gates=torch.tensor([0.0, 1.0])):
            gated = model(IDS).logits
    assert torch.equal(gated[0], plain[0])
    assert not torch.allclose(gated[1], plain[1])


def test_handle_removes_every_hook_and_restores_the_model() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    with torch.no_grad():
        plain = model(IDS).logits
    handle = add_steering(layers, torch.randn(4, 32), [1, 2], alpha=4.0)
    assert handle.active and all(layers[i]._forward_hooks for i in (1, 2))
    handle.remove()
    assert not handle.active and all(not layer._forward_hooks for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain)


def test_gates_expand_over_beams_and_return_sequences() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    ids = IDS.repeat_interleave(2, dim=0)  # what generate() does for num_beams=2
    with torch.no_grad():
        plain = model(ids).logits
        with add_steering(layers, torch.randn(4, 32), [1], alpha=4.0, row_gates=torch.tensor([1.0, 0.0])):
            gated = model(ids).logits
    assert torch.equal(gated[2:], plain[2:]) and not torch.allclose(gated[:2], plain[:2])


def test_bad_steering_arguments() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    with pytest.raises(VectorMismatchError, match=r"outside 0\.\.3"):
        add_steering(layers, torch.randn(4, 32), [4], alpha=1.0)
    with pytest.raises(VectorMismatchError, match="has 4 layers"):
        add_steering(layers, torch.randn(3, 32), [1], alpha=1.0)
    with (
        add_steering(layers, torch.randn(4, 32), [1], alpha=1.0, row_gates=torch.ones(3)),
        pytest.raises(VectorMismatchError, match="does not match 3 gate values"),
        torch.no_grad(),
    ):
        model(IDS)


def test_the_shift_is_added_in_place_outside_autograd_and_out_of_place_inside() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []
    layers[1].register_forward_hook(lambda _m, _a, out: seen.append(block_hidden(out)), prepend=True)
    ids = torch.tensor([[5, 6, 7]])
    with add_steering(layers, torch.randn(4, 32), [1], alpha=2.0):
        layers[1].register_forward_hook(lambda _m, _a, out: seen.append(block_hidden(out)))  # after the steering
        with torch.inference_mode():
            model(input_ids=ids)
        assert seen[0] is seen[1]  # no new tensor per step
        seen.clear()
        model(input_ids=ids)
        assert seen[0] is not seen[1] and seen[1].requires_grad
