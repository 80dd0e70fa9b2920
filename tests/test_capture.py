"""`capture_layers`: reads a block's output, stops a pass where asked, removes its hooks, and never swallows another
capture's stop."""

from __future__ import annotations

import torch
from tiny import tiny_model

from inferaligner.capture import capture_layers
from inferaligner.models import decoder_layers


def test_a_stopped_pass_reads_its_layer_and_leaves_no_hook() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    ids = torch.tensor([[1, 2, 3]])
    ran_on = False
    with torch.inference_mode(), capture_layers(layers, [0, 1], stop=True) as captured:
        model(input_ids=ids)
        ran_on = True  # never reached: the pass stopped at block 1, and the block ends there
    assert not ran_on and set(captured) == {0, 1} and captured[1].shape[:2] == (1, 3)
    assert all(not layer._forward_hooks for layer in layers)
    with torch.inference_mode():
        full = model(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(captured[1], full.hidden_states[2])  # block 1's output is hidden_states[2]


def test_another_captures_stop_is_not_swallowed() -> None:
    model = tiny_model("llama")
    layers = decoder_layers(model)
    after_inner = False
    with torch.inference_mode(), capture_layers(layers, [2], stop=True) as outer:
        with capture_layers(layers, [0]) as inner:
            model(input_ids=torch.tensor([[1, 2, 3]]))
        after_inner = True  # the outer capture's stop must end the outer block, not only the inner one
    assert not after_inner and 0 in inner and 2 in outer
    assert all(not layer._forward_hooks for layer in layers)
