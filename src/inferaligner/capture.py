"""Reading decoder blocks' outputs during a forward pass, and stopping the pass once the last block wanted has run.

`capture_layers` is the one way the library reads a layer: extraction (`activations`), the gate's own pass
(`aligner`), turns read alone (`reader`), the gate-layer outputs the server's prefix cache keeps
(`serve.continuous`) and the blocks below the fitted layers (`fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from inferaligner.models import block_hidden


class LayerReached(Exception):
    """Raised by the last hooked block when the pass should stop there; `capture_layers` ends it quietly."""


def hidden_of(_layer: int, output: Any) -> Any:
    """The default reading: the block's hidden states."""
    return block_hidden(output)


@contextmanager
def capture_layers(
    layers: nn.ModuleList, indices: Sequence[int], read: Callable[[int, Any], Any] = hidden_of, *, stop: bool = False
) -> Iterator[dict[int, Any]]:
    """Hook blocks `indices`: inside the `with` block, each forward pass stores `read(index, output)` of each of them
    in the dict it yields (the latest pass wins). With `stop`, the pass ends once the highest index has run: the
    model call inside the block returns early, without an error (and without an output). Hooks are removed on exit.
    """
    captured: dict[int, Any] = {}
    last = max(indices)
    reached = LayerReached()  # this capture's own: another capture's stop is not swallowed here

    def hook_for(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[index] = read(index, output)
            if stop and index == last:
                raise reached

        return hook

    handles = [layers[index].register_forward_hook(hook_for(index)) for index in sorted(set(indices))]
    try:
        yield captured
    except LayerReached as stopped:
        if stopped is not reached:
            raise
    finally:
        for handle in handles:
            handle.remove()
