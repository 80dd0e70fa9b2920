"""Forward hooks that add `alpha * g * theta_l` to the output of steered decoder blocks, per sequence.

Every position of the block output is shifted: prompt tokens during prefill and each new token during
KV-cached decoding; outside autograd the shift is added in place, so a decoding step allocates nothing (and a hook
that kept the block's output, e.g. `output_hidden_states`, sees it steered). `g` holds one gate value per batch row,
so rows whose gate is 0 pass through bit-for-bit.
Registering the hooks mutates the model until `remove()` (or the end of the `with` block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from inferaligner.errors import VectorMismatchError
from inferaligner.models import block_hidden, with_block_hidden


class SteeringHandle:
    """Active steering hooks on a model; a context manager and a removable handle."""

    def __init__(
        self,
        layers: nn.ModuleList,
        directions: torch.Tensor,
        layer_ids: Sequence[int],
        alpha: float,
        row_gates: torch.Tensor | None = None,
    ) -> None:
        if directions.ndim != 2 or directions.shape[0] != len(layers):
            raise VectorMismatchError(
                f"Steering directions have shape {tuple(directions.shape)} but the model has {len(layers)} layers."
            )
        bad = [i for i in layer_ids if not 0 <= i < len(layers)]
        if bad:
            raise VectorMismatchError(f"Steering layers {bad} are outside 0..{len(layers) - 1}.")
        self.alpha = float(alpha)
        self._row_gates = row_gates
        # Each layer's shift, built once per batch shape (no host-to-device copy per decoding step) and dropped when
        # the row gates change.
        self._shifts: dict[tuple[int, torch.device, torch.dtype, int], torch.Tensor] = {}
        self._handles = [
            layers[i].register_forward_hook(self._make_hook(i, directions[i].detach().clone())) for i in layer_ids
        ]

    @property
    def row_gates(self) -> torch.Tensor | None:
        """Each row's gate (`None`: every row steered at full strength)."""
        return self._row_gates

    @row_gates.setter
    def row_gates(self, gates: torch.Tensor | None) -> None:
        self._row_gates = gates
        self._shifts.clear()

    def _make_hook(self, layer: int, direction: torch.Tensor) -> Any:
        def hook(_module: nn.Module, args: Any, output: Any) -> Any:
            hidden = block_hidden(output)
            key = (layer, hidden.device, hidden.dtype, hidden.shape[0])
            shift = self._shifts.get(key)
            if shift is None:
                shift = self._shifts[key] = self._shift(direction, hidden)
            # Out of place while fitting (autograd needs the block's output intact) and when the block hands back
            # its input or a view of another tensor (adding in place would change that tensor too).
            if hidden.requires_grad or hidden._base is not None or (args and hidden is args[0]):
                return with_block_hidden(output, hidden + shift)
            hidden.add_(shift)  # in place: no allocation per decoding step
            return None

        return hook

    def _shift(self, direction: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`alpha * theta`, times each row's gate, shaped to broadcast over [batch, positions, hidden]."""
        shift = (self.alpha * direction).to(device=hidden.device, dtype=hidden.dtype)
        if self.row_gates is None:
            return shift
        gates = self.row_gates
        rows = hidden.shape[0]
        if rows != len(gates):
            # generate() expands each prompt into beams / return sequences, consecutively.
            if rows % len(gates):
                raise VectorMismatchError(f"Batch of {rows} rows does not match {len(gates)} gate values.")
            gates = gates.repeat_interleave(rows // len(gates))
        gates = gates.to(device=hidden.device, dtype=hidden.dtype).view(rows, *([1] * (hidden.ndim - 1)))
        return gates * shift

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Detach every hook; the model is unchanged afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_steering(
    layers: nn.ModuleList,
    directions: torch.Tensor,
    layer_ids: Sequence[int],
    alpha: float,
    row_gates: torch.Tensor | None = None,
) -> SteeringHandle:
    """Hook `alpha * row_gates[b] * directions[l]` onto block `l` for each `l` in `layer_ids`.

    `row_gates=None` steers every row. Use as `with add_steering(...): model.generate(...)`, or keep the handle
    and call `remove()`.
    """
    return SteeringHandle(layers, directions, layer_ids, alpha, row_gates)
