"""InferAligner: a target model, safety steering vectors and a gate, behind `generate` / `complete` / `stream`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.errors import InferAlignerError, VectorMismatchError
from inferaligner.gate import Gate, GateDecision, choose_steer_layers, pool
from inferaligner.models import EMBEDDED_MODEL, block_hidden, context_length, decoder_layers, load_model
from inferaligner.prompts import encode, format_chats, position_ids
from inferaligner.steer import add_steering
from inferaligner.vectors import SafetyVectors

DEFAULT_ALPHA = 4.0
STEER_SCALES = ("unit", "raw")  # alpha times the unit vectors (the paper), or times the raw differences
DEFAULT_REFUSAL = (
    "I can't help with that. The request could lead to real harm to people, so I won't provide it. "
    "If you have a related question that is safe, I'm glad to help."
)


class Mode(str, Enum):
    """How the aligner intervenes."""

    INFERALIGNER = "inferaligner"  # steer with the aligned model's vectors when the gate fires (the method)
    SELF = "self"  # steer with the target's own vectors when the gate fires (ablation)
    SIMPLE = "simple"  # answer with a fixed refusal when the gate fires; no aligned model needed
    ALWAYS = "always"  # steer with the aligned model's vectors on every input (no gate; ablation)
    OFF = "off"  # plain generation; the gate is still reported when target vectors are given


@dataclass(frozen=True)
class Completion:
    """One generated answer and what the gate said about its prompt."""

    prompt: str
    text: str
    gate: GateDecision | None
    intervened: bool  # steered (or, in simple mode, replaced by the refusal)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "completion": self.text,
            "gate": self.gate.as_dict() if self.gate else None,
            "intervened": self.intervened,
        }


class _GateReached(Exception):
    """Stops the gate's forward pass once the gate layer has run."""


class InferAligner:
    """Gated inference-time alignment of a causal LM.

    `target_vectors` are the target model's own safety-related vectors (they define the gate); `aligned_vectors`
    are the safety steering vectors: the aligned model's mean differences (the paper), or vectors fitted on the
    target to reproduce the aligned model's answers (`inferaligner.fit`). Steering adds `alpha` times the unit
    vectors, as in the paper, or with `steer_scale="raw"` times the raw vectors (the default for fitted ones,
    whose strength is part of the fit). Which vectors a mode needs:
    inferaligner both, self and simple the target's, always the aligned ones, off none. The model is only hooked
    during generation calls; calls from several threads take turns, since hooks act on the whole model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        target_vectors: SafetyVectors | None = None,
        aligned_vectors: SafetyVectors | None = None,
        mode: Mode | str = Mode.INFERALIGNER,
        alpha: float = DEFAULT_ALPHA,
        steer_layers: Sequence[int] | None = None,
        gate_layer: int | None = None,
        gate_bias: float | None = None,
        refusal: str = DEFAULT_REFUSAL,
        system: str | None = None,
        layers_path: str | None = None,
        steer_scale: str | None = None,
    ) -> None:
        if steer_scale is not None and steer_scale not in STEER_SCALES:
            raise InferAlignerError(f"steer_scale must be 'unit' or 'raw', not '{steer_scale}'.")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = Mode(mode)
        self.alpha = float(alpha)
        self.refusal = refusal
        self.system = system
        self.layers = decoder_layers(model, layers_path)
        self._lock = threading.RLock()
        needs_target = self.mode in (Mode.INFERALIGNER, Mode.SELF, Mode.SIMPLE)
        needs_aligned = self.mode in (Mode.INFERALIGNER, Mode.ALWAYS)
        if needs_target and target_vectors is None:
            raise InferAlignerError(f"Mode '{self.mode.value}' needs the target's own vectors (--target-vectors).")
        if needs_aligned and aligned_vectors is None:
            raise InferAlignerError(f"Mode '{self.mode.value}' needs the aligned model's vectors (--aligned-vectors).")
        for vectors, role in ((target_vectors, "target vectors"), (aligned_vectors, "aligned vectors")):
            if vectors is not None:
                vectors.check_fits(model, role)
        if target_vectors is not None and aligned_vectors is not None:
            aligned_vectors.check_compatible(target_vectors, ("aligned", "target"))
        self.target_vectors = target_vectors
        self.aligned_vectors = aligned_vectors
        self.gate: Gate | None = target_vectors.make_gate(gate_layer, gate_bias) if target_vectors else None
        steering = {
            Mode.INFERALIGNER: aligned_vectors,
            Mode.ALWAYS: aligned_vectors,
            Mode.SELF: target_vectors,
        }
        self.steering_vectors = steering.get(self.mode)
        fitted = self.steering_vectors is not None and self.steering_vectors.fitted
        if fitted and steer_scale == "unit":
            raise InferAlignerError("Teacher-fitted vectors carry their own strength: steer them at scale 'raw'.")
        self.steer_scale = steer_scale or ("raw" if fitted else "unit")
        if self.steering_vectors is None:
            self.steer_layers: list[int] = []
        elif steer_layers is not None:
            self.steer_layers = sorted(set(steer_layers))
        else:
            self.steer_layers = default_steer_layers(self.steering_vectors, target_vectors)

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path = EMBEDDED_MODEL,
        *,
        target_vectors: str | Path | None = None,
        aligned_vectors: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> InferAligner:
        """Load the target model and the vector files, then build the aligner (other options as in `__init__`)."""
        model, tokenizer = load_model(target, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return cls(
            model,
            tokenizer,
            target_vectors=SafetyVectors.load(target_vectors) if target_vectors else None,
            aligned_vectors=SafetyVectors.load(aligned_vectors) if aligned_vectors else None,
            **kwargs,
        )

    @property
    def steer_directions(self) -> torch.Tensor | None:
        """What is added per layer (times alpha): the unit vectors (the paper), or with `steer_scale="raw"` the
        unnormalised harmful-minus-harmless differences, whose size follows each layer's own activation scale."""
        if self.steering_vectors is None:
            return None
        vectors = self.steering_vectors
        return vectors.directions * vectors.norms[:, None] if self.steer_scale == "raw" else vectors.directions

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[str], max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Chat-format and tokenize user instructions into a left-padded batch (`input_ids`, `attention_mask`)
        on the model's device, ready for `generate`; raises `PromptTooLongError` if a prompt plus
        `max_new_tokens` would not fit the context."""
        texts = format_chats(self.tokenizer, prompts, self.system)
        batch = encode(self.tokenizer, texts, max_tokens=context_length(self.model), reserve=max_new_tokens)
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def gate_decisions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_inputs: Any
    ) -> list[GateDecision] | None:
        """The gate for each row, read at its last real prompt token (or pooled over the prompt, as the gate says);
        `None` when there is no gate.

        Runs the unsteered model only up to the gate layer.
        """
        if self.gate is None:
            return None
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        model_inputs.pop("position_ids", None)
        captured: list[torch.Tensor] = []
        gate = self.gate

        def capture(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            hidden = block_hidden(output)
            if hidden.shape[1] != mask.shape[1]:  # a model that expands image placeholders inside its forward pass
                raise InferAlignerError("The gate cannot read a prompt whose length the model changes.")
            captured.append(pool(hidden, mask, gate.pooling))
            raise _GateReached

        with self._lock:
            handle = self.layers[self.gate.layer].register_forward_hook(capture)
            try:
                self._run_to_gate(input_ids, mask, model_inputs)
            except _GateReached:
                pass
            finally:
                handle.remove()
        return self.gate.decide(captured[0])

    def _run_to_gate(self, input_ids: torch.Tensor, mask: torch.Tensor, model_inputs: dict[str, Any]) -> None:
        with torch.inference_mode():
            self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
                **model_inputs,
            )

    def row_gates(self, decisions: list[GateDecision] | None, rows: int) -> torch.Tensor:
        """The per-row steering gate for this mode: 1.0 where the row is steered, else 0.0."""
        if self.mode is Mode.ALWAYS:
            return torch.ones(rows)
        if self.mode in (Mode.OFF, Mode.SIMPLE) or decisions is None:
            return torch.zeros(rows)
        return torch.tensor([1.0 if d.fired else 0.0 for d in decisions])

    def intervened(self, decisions: list[GateDecision] | None, rows: int) -> list[bool]:
        """Per row, whether InferAligner changed the answer (steered it, or in simple mode replaced it)."""
        if self.mode is Mode.SIMPLE:
            return [bool(d.fired) for d in decisions] if decisions else [False] * rows
        return [bool(g) for g in self.row_gates(decisions, rows)]

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        return_gates: bool = False,
        gates: list[GateDecision] | None = None,
        allowed: Sequence[bool] | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """`model.generate` with InferAligner applied: a drop-in, rows gated independently.

        Returns what `model.generate` returns, or `(output, gate decisions)` with `return_gates=True`.
        `gates` passes decisions already made by `gate_decisions` for these rows, to skip the gate pass.
        `allowed` marks the rows InferAligner may act on (default: all); the others are generated plainly.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.pop("position_ids", None)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        extra = {k: v for k, v in generate_kwargs.items() if k in ("pixel_values", "image_sizes")}
        with self._lock:
            decisions = gates if gates is not None else self.gate_decisions(input_ids, attention_mask, **extra)
            allow = torch.tensor([bool(a) for a in allowed] if allowed is not None else [True] * len(input_ids))
            output = self._generate(input_ids, attention_mask, decisions, allow, generate_kwargs)
        return (output, decisions) if return_gates else output

    def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decisions: list[GateDecision] | None,
        allowed: torch.Tensor,
        generate_kwargs: dict[str, Any],
    ) -> Any:
        row_gates = self.row_gates(decisions, len(input_ids)) * allowed
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **generate_kwargs}
        refuse = [bool(d.fired and a) for d, a in zip(decisions or [], allowed.tolist(), strict=False)]
        if self.mode is Mode.SIMPLE and any(refuse):
            return self._refuse(inputs, refuse)
        directions = self.steer_directions
        if bool(row_gates.any()) and directions is not None:
            with add_steering(self.layers, directions, self.steer_layers, self.alpha, row_gates):
                return self.model.generate(**inputs)
        return self.model.generate(**inputs)

    def _refuse(self, inputs: dict[str, Any], fired: list[bool]) -> Any:
        """SIMPLE mode: fired rows get the fixed refusal; the others are generated as usual (same batch)."""
        input_ids = inputs["input_ids"]
        streamer = inputs.pop("streamer", None)
        refusal = self.tokenizer(self.refusal, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            refusal = [*refusal, self.tokenizer.eos_token_id]
        refusal = refusal[: inputs.get("max_new_tokens") or len(refusal)]
        if all(fired):
            output: Any = input_ids
            new = input_ids.new_empty((len(input_ids), 0))
            if streamer is not None:
                streamer.put(input_ids.cpu())
                streamer.put(torch.tensor(refusal))
                streamer.end()
        else:
            output = self.model.generate(**inputs, streamer=streamer)
            new = _sequences(output)[:, input_ids.shape[1] :]
        width = max(new.shape[1], len(refusal))
        pad = inputs.get("pad_token_id", self.tokenizer.pad_token_id)
        rows = new.new_full((len(input_ids), width), pad)
        rows[:, : new.shape[1]] = new
        for row, row_fired in enumerate(fired):
            if row_fired:
                rows[row] = pad
                rows[row, : len(refusal)] = torch.tensor(refusal)
        sequences = torch.cat([input_ids, rows], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        progress: bool = False,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Answer user instructions (chat-formatted here), greedy unless sampling is asked for."""
        generate_kwargs.setdefault("do_sample", False)
        results: list[Completion] = []
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
            chunk = list(prompts[start : start + batch_size])
            batch = self.encode(chunk, max_new_tokens)
            output, decisions = self.generate(
                **batch, max_new_tokens=max_new_tokens, return_gates=True, **generate_kwargs
            )
            new = _sequences(output)[:, batch["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            changed = self.intervened(decisions, len(chunk))
            for i, (prompt, text) in enumerate(zip(chunk, texts, strict=True)):
                results.append(Completion(prompt, text.strip(), decisions[i] if decisions else None, changed[i]))
        return results

    def stream(
        self, prompt: str, *, max_new_tokens: int = 256, **generate_kwargs: Any
    ) -> tuple[GateDecision | None, Iterator[str]]:
        """The gate decision for `prompt` and an iterator over the answer's text pieces as they are generated."""
        batch = self.encode([prompt], max_new_tokens)
        decisions = self.gate_decisions(**batch)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_kwargs.setdefault("do_sample", False)
        kwargs = {
            **batch,
            "max_new_tokens": max_new_tokens,
            "streamer": streamer,
            "gates": decisions,
            **generate_kwargs,
        }
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller after the stream ends
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            yield from streamer
            thread.join()
            if errors:
                raise errors[0]

        return (decisions[0] if decisions else None), pieces()


def default_steer_layers(steering: SafetyVectors, gate_vectors: SafetyVectors | None) -> list[int]:
    """`L_G`: the layers where both the steering source and the target separate harmful from harmless (for
    teacher-fitted vectors: the layers they were fitted on)."""
    if steering.fitted:
        return steering.fitted_layers
    steer_acc = _accuracy(steering)
    target_acc = _accuracy(gate_vectors) if gate_vectors is not None else steer_acc
    if steer_acc.shape != target_acc.shape:
        raise VectorMismatchError("Steering and gate vectors have different layer counts.")
    return choose_steer_layers(target_acc, steer_acc)


def _accuracy(vectors: SafetyVectors) -> torch.Tensor:
    for key in ("calibration.accuracy", "extraction.accuracy"):
        if key in vectors.metrics:
            return vectors.metrics[key]
    raise InferAlignerError(
        f"The vectors from {vectors.provenance.describe()} carry no accuracy metrics: pass the layers by hand."
    )


def _sequences(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.sequences
