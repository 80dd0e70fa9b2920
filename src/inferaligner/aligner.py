"""InferAligner: a target model, safety steering vectors and a gate, behind `generate` / `complete` / `stream`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.capture import capture_layers
from inferaligner.errors import InferAlignerError, VectorFileError, VectorMismatchError
from inferaligner.gate import Gate, GateDecision, choose_steer_layers, pool
from inferaligner.models import (
    EMBEDDED_MODEL,
    block_hidden,
    context_length,
    decoder_layers,
    model_fingerprint,
)
from inferaligner.onepass import OnePass
from inferaligner.plan import Action, Plan, RowPlan, make_plan
from inferaligner.prompts import encode, format_chats, position_ids
from inferaligner.reader import RequestReader
from inferaligner.settings import (
    DEFAULT_ALPHA,
    FITTED_ALPHA,
    AlignerSettings,
    Mode,
    SettingsError,
    SteeringSettings,
    SteerScale,
)
from inferaligner.steer import add_steering
from inferaligner.strength import SteeringStrength, residual_norms, steering_strength
from inferaligner.turns import prompt_turns
from inferaligner.vectors import SafetyVectors


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


class InferAligner(OnePass):
    """Gated inference-time alignment of a causal LM.

    `target_vectors` are the target model's own safety-related vectors (they define the gate); `aligned_vectors`
    are the safety steering vectors: the aligned model's mean differences (the paper), or vectors fitted on the
    target to reproduce the aligned model's answers (`inferaligner.fit`). `settings` (an `AlignerSettings`; keyword
    options override its fields) say the mode, alpha, steered layers, scale and gate. Which vectors a mode needs:
    inferaligner both, self and simple the target's, always the aligned ones, off none.

    The aligner alone decides what happens to each row (`decide` -> `Plan`) and owns the model's hooks: every
    forward pass that acts on a plan runs inside `steered(plan)`, which holds the aligner's lock, so calls from
    several threads take turns. Everything is validated here, when the aligner is built, with one-line errors.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        target_vectors: SafetyVectors | None = None,
        aligned_vectors: SafetyVectors | None = None,
        aligned_model: PreTrainedModel | None = None,
        settings: AlignerSettings | None = None,
        **options: Any,
    ) -> None:
        self.settings = (settings or AlignerSettings()).merged(**options)
        mode = self.settings.mode
        self.model = model
        self.tokenizer = tokenizer
        self.layers = decoder_layers(model, self.settings.layers_path)
        self._lock = threading.RLock()
        _check_parts(model, mode, target_vectors, aligned_vectors, aligned_model)
        self.aligned_model = aligned_model
        self.target_vectors = target_vectors
        self.aligned_vectors = aligned_vectors
        self.gate: Gate | None = (
            target_vectors.make_gate(self.settings.gate_layer, self.settings.gate_bias) if target_vectors else None
        )
        if self.gate is None and self.settings.gate_layer is not None:
            raise SettingsError("gate_layer was given but there is no gate: give the target's vectors.")
        self._reader: RequestReader | None = None
        steering = {Mode.INFERALIGNER: aligned_vectors, Mode.ALWAYS: aligned_vectors, Mode.SELF: target_vectors}
        self.steering_vectors = steering.get(mode)
        self._resolve_steering()
        self._directions = self._steer_directions()
        self.strength = self._measure_strength()

    def _resolve_steering(self) -> None:
        """Alpha, scale and steered layers as used: the settings', else what the steering vectors imply."""
        vectors = self.steering_vectors
        fitted = vectors is not None and vectors.fitted
        if fitted and self.settings.steer_scale is SteerScale.UNIT:
            raise SettingsError("Teacher-fitted vectors carry their own strength: steer them at scale 'raw'.")
        self.alpha = self.settings.alpha or (FITTED_ALPHA if fitted else DEFAULT_ALPHA)
        # A scale means something only when a mode steers; otherwise it reads as the paper's (unit).
        default_scale = SteerScale.RAW if fitted else SteerScale.UNIT
        self.steer_scale = (self.settings.steer_scale or default_scale) if vectors is not None else SteerScale.UNIT
        if vectors is None:
            self.steer_layers: list[int] = []
        elif self.settings.steer_layers is not None:
            self.steer_layers = list(self.settings.steer_layers)
        else:
            self.steer_layers = default_steer_layers(vectors, self.target_vectors)
        outside = [i for i in self.steer_layers if i >= len(self.layers)]
        if outside:
            raise SettingsError(f"steer_layers {outside} are outside this model's layers 0..{len(self.layers) - 1}.")

    def _measure_strength(self) -> SteeringStrength | None:
        """How strongly the steering acts (`inferaligner.strength`); a weak one is refused unless allowed."""
        if self._directions is None:
            return None
        norms = residual_norms(self.model, self.tokenizer, self.layers)
        strength = steering_strength(norms, self._directions, self.steer_layers, self.alpha)
        if strength.weak and not self.settings.allow_weak_steering:
            raise SettingsError(
                f"This steering would not protect: {strength.problem()}. Raise alpha or steer other layers; "
                "--allow-weak-steering runs it anyway (its rows are then never reported as intervened)."
            )
        return strength

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path = EMBEDDED_MODEL,
        *,
        target_vectors: str | Path | None = None,
        aligned_vectors: str | Path | None = None,
        steering: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        **options: Any,
    ) -> InferAligner:
        """Load the target model (any name `inferaligner.loading.load` takes) and the vector files, then build the
        aligner. `steering` is a steering settings file (`inferaligner calibrate`): its vectors steer unless
        `aligned_vectors` is given, and its alpha, layers and scale take the place of those in `settings`; keyword
        options (as in `__init__`) win over both, as options given to the CLI win over its `--settings` file.

        `target` may be a folder from `inferaligner align`: its model, gate and settings are used (`model=` loads
        another copy of the same model instead; one of another shape is an error)."""
        from inferaligner.aligned_folder import AlignedFolder, is_aligned_folder
        from inferaligner.loading import load
        from inferaligner.models import model_fingerprint

        folder = AlignedFolder.load(target) if is_aligned_folder(target) else None
        if folder is not None:
            target = options.pop("model", None) or folder.model
            target_vectors = target_vectors or folder.gate
            steering = steering or folder.settings
        chosen = SteeringSettings.load(steering) if steering else None
        aligned = SafetyVectors.load(aligned_vectors) if aligned_vectors else None
        if aligned is None and chosen is not None:
            aligned = chosen.load_vectors()
        base = options.pop("settings", None) or AlignerSettings()
        settings = base.merged(**chosen.overrides()) if chosen else base
        loaded = load(target, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if folder is not None:
            folder.check_model(str(target), model_fingerprint(loaded.model))
        return cls(
            loaded.model,
            loaded.tokenizer,
            aligned_vectors=aligned,
            settings=settings,
            **options,
            target_vectors=SafetyVectors.load(target_vectors) if target_vectors else None,
        )

    def variant(self, **options: Any) -> InferAligner:
        """An aligner on the same model and vectors with some settings changed (e.g. `mode="off"` for the plain
        target); it shares this one's lock, since both hook the same model."""
        other = type(self)(
            self.model,
            self.tokenizer,
            target_vectors=self.target_vectors,
            aligned_vectors=self.aligned_vectors,
            aligned_model=self.aligned_model,
            settings=self.settings.merged(**options),
        )
        other._lock = self._lock
        return other

    def _steer_directions(self) -> torch.Tensor | None:
        """What is added per layer (times alpha): the unit vectors (the paper), or at raw scale the unnormalised
        vectors, whose size follows each layer's own activation scale (fitted vectors: the fitted size)."""
        vectors = self.steering_vectors
        if vectors is None:
            return None
        return vectors.directions * vectors.norms[:, None] if self.steer_scale is SteerScale.RAW else vectors.directions

    @property
    def steer_directions(self) -> torch.Tensor | None:
        """The per-layer vectors that steering adds (times alpha), at the resolved scale; `None` if nothing steers."""
        return self._directions

    @property
    def reader(self) -> RequestReader | None:
        """What reads each turn alone for a `"turns"` gate (`inferaligner.reader`, made on first use, keeping the
        features of the turns it read); `None` for any other gate."""
        gate = self.gate
        if gate is None or gate.pooling != "turns":
            return None
        if self._reader is None or self._reader.layer != gate.layer:
            self._reader = RequestReader(self.model, self.tokenizer, self.layers, gate.layer)
        return self._reader

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """What this aligner does, resolved (layers and scale as used, the gate as read): for logs, caches, reports."""
        gate = self.gate
        return {
            "model": getattr(self.model, "name_or_path", ""),
            "mode": self.settings.mode.value,
            "alpha": self.alpha if self.steering_vectors is not None else None,
            "scale": self.steer_scale.value,
            "layers": self.steer_layers,
            "vectors": "teacher-fitted"
            if self.steering_vectors is not None and self.steering_vectors.fitted
            else ("mean-difference" if self.steering_vectors is not None else None),
            "gate": [gate.layer, round(gate.bias, 6)] if gate else None,
            "system": self.settings.system,
            "refusal": self.settings.refusal,
            "aligned_model": None if self.aligned_model is None else getattr(self.aligned_model, "name_or_path", ""),
            "loop_span": self.settings.loop_span,
            "vectors_id": None if self.steering_vectors is None else self.steering_vectors.content_id(),
        }

    def encode(self, prompts: Sequence[str], max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Chat-format and tokenize user instructions into a left-padded batch (`input_ids`, `attention_mask`)
        on the model's device, ready for `generate`; raises `PromptTooLongError` if a prompt plus
        `max_new_tokens` would not fit the context."""
        texts = format_chats(self.tokenizer, prompts, self.settings.system)
        batch = encode(self.tokenizer, texts, max_tokens=context_length(self.model), reserve=max_new_tokens)
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def prompt_turns(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, chat: bool = True
    ) -> list[list[list[int]]]:
        """What a `"turns"` gate reads of each (padded) prompt: the token ids of each user and system turn
        (`inferaligner.turns`); a prompt that is not a chat (`chat=False`: raw text) is one turn."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [ids[keep].tolist() for ids, keep in zip(input_ids.cpu(), mask.cpu().bool(), strict=True)]
        return [prompt_turns(self.tokenizer, row, chat=chat) for row in rows]

    def split_turns(
        self, turns: Sequence[Sequence[Sequence[int]]]
    ) -> tuple[dict[tuple[int, ...], torch.Tensor], list[tuple[int, ...]]]:
        """For a `"turns"` gate: the features it has read of these prompts' turns, and the turns it has not read
        yet (`RequestReader.split`)."""
        if self.reader is None:
            raise InferAlignerError("Only a turns gate reads turns.")
        with self._lock:
            return self.reader.split(turns)

    def gate_decisions(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        turns: Sequence[Sequence[Sequence[int]]] | None = None,
        **model_inputs: Any,
    ) -> list[GateDecision] | None:
        """The gate for each row, read at its last real prompt token, pooled over the prompt, or (a `"turns"` gate)
        turn by turn, each read as a lone request (`inferaligner.reader`; `turns` as `prompt_turns` gives them,
        else the ids are read as chats, which may then be `None`); `None` when there is no gate.

        Runs the unsteered model only up to the gate layer.
        """
        if self.gate is None:
            return None
        if self.reader is not None:
            if turns is None:
                if input_ids is None:
                    raise InferAlignerError("A turns gate reads either the prompts' ids or their turns: give one.")
                turns = self.prompt_turns(input_ids, attention_mask)
            with self._lock:
                read = self.reader.read(turns)
            return self.gate.decide_turns(read)
        if input_ids is None:
            raise InferAlignerError("This gate reads the prompts' ids: give them.")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        model_inputs.pop("position_ids", None)
        gate = self.gate

        def read(_layer: int, output: Any) -> torch.Tensor:
            hidden = block_hidden(output)
            if hidden.shape[1] != mask.shape[1]:  # a model that expands image placeholders inside its forward pass
                raise InferAlignerError("The gate cannot read a prompt whose length the model changes.")
            return pool(hidden, mask, gate.pooling)

        with self._lock, capture_layers(self.layers, [gate.layer], read, stop=True) as captured:
            self._run_to_gate(input_ids, mask, model_inputs)
        return gate.decide(captured[gate.layer])

    def _run_to_gate(self, input_ids: torch.Tensor, mask: torch.Tensor, model_inputs: dict[str, Any]) -> None:
        with torch.inference_mode():
            self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
                **model_inputs,
            )

    def plan(self, decisions: Sequence[GateDecision] | None, rows: int, allowed: Sequence[bool] | None = None) -> Plan:
        """What this aligner does to each row, given the gate's decisions (see `inferaligner.plan.make_plan`).
        `allowed` marks the rows InferAligner may act on (default: all)."""
        effective = self.strength is None or not self.strength.weak
        return make_plan(self.settings.mode, decisions, rows, self.settings.refusal, allowed, effective)

    def decide(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        allowed: Sequence[bool] | None = None,
        turns: Sequence[Sequence[Sequence[int]]] | None = None,
        **model_inputs: Any,
    ) -> Plan:
        """Read the gate on these prompts (when the mode has one) and plan every row (`turns`: as in
        `gate_decisions`)."""
        decisions = self.gate_decisions(input_ids, attention_mask, turns=turns, **model_inputs)
        return self.plan(decisions, len(input_ids), allowed)

    @contextmanager
    def steered(self, plan: Plan, repeat: int = 1) -> Iterator[None]:
        """The model as `plan` wants it, for any forward pass or `generate` call inside the block: steering hooks on
        the steered rows (each row repeated `repeat` times in the batch), none when no row is steered. Holds the
        aligner's lock, since hooks act on the whole model."""
        with self._lock:
            if plan.steers and self._directions is not None:
                gates = plan.steer_gates(repeat)
                with add_steering(self.layers, self._directions, self.steer_layers, self.alpha, gates):
                    yield
            else:
                yield

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        plan: Plan | None = None,
        allowed: Sequence[bool] | None = None,
        return_plan: bool = False,
        on_plan: Callable[[Plan], None] | None = None,
        turns: Sequence[Sequence[Sequence[int]]] | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """`model.generate` with InferAligner applied: a drop-in, rows planned independently.

        Returns what `model.generate` returns, or `(output, plan)` with `return_plan=True`. The gate is read inside
        generation's own prefill where it can be (`try_one_pass`), else in a partial pass before it. `plan` passes a
        plan already made by `decide` for these rows; `allowed` marks the rows InferAligner may act on (default:
        all), when no plan is given; `on_plan(plan)` is called once the plan is known, before the first new token.
        `turns` says what a `"turns"` gate reads of each row (`prompt_turns`; by default the ids are read as chats).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.pop("position_ids", None)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self._lock:
            if plan is None:
                output, plan = self.try_one_pass(
                    input_ids, attention_mask, allowed=allowed, on_plan=on_plan, turns=turns, **generate_kwargs
                )
                if output is not None:
                    return (output, plan) if return_plan else output
            elif len(plan) != len(input_ids):
                raise InferAlignerError(f"A plan for {len(plan)} rows was given for a batch of {len(input_ids)}.")
            if on_plan is not None:
                on_plan(plan)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **generate_kwargs}
            inputs = self._planned_loop_stop(inputs, input_ids.shape[1], plan)
            if plan.refuses:
                output = self._refuse(inputs, plan)
            elif plan.delegates:
                output = self._delegate(inputs, plan)
            else:
                with self.steered(plan):
                    output = self.model.generate(**inputs)
        return (output, plan) if return_plan else output

    def _refuse(self, inputs: dict[str, Any], plan: Plan) -> Any:
        """Refused rows get their fixed answer; the others are generated as the plan says (same batch)."""
        input_ids = inputs["input_ids"]
        streamer = inputs.pop("streamer", None)
        answers = {row: self._answer_ids(r.answer, inputs) for row, r in enumerate(plan) if r.answer is not None}
        if len(answers) == len(plan):
            output: Any = input_ids
            new = input_ids.new_empty((len(input_ids), 0))
            if streamer is not None:
                streamer.put(input_ids.cpu())
                streamer.put(torch.tensor(answers[0]))
                streamer.end()
        else:
            with self.steered(plan):
                output = self.model.generate(**inputs, streamer=streamer)
            new = _sequences(output)[:, input_ids.shape[1] :]
        width = max(new.shape[1], *(len(a) for a in answers.values()))
        pad = inputs.get("pad_token_id", self.tokenizer.pad_token_id)
        rows = new.new_full((len(input_ids), width), pad)
        rows[:, : new.shape[1]] = new
        for row, answer in answers.items():
            rows[row] = pad
            rows[row, : len(answer)] = torch.tensor(answer)
        sequences = torch.cat([input_ids, rows], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def _delegate(self, inputs: dict[str, Any], plan: Plan) -> torch.Tensor:
        """Mode "aligned": delegated rows are generated by the aligned model, the others by the target as planned;
        the two sub-batches are merged back in row order (new tokens padded with the pad token)."""
        if inputs.get("return_dict_in_generate") or any(k in inputs for k in ("pixel_values", "image_sizes")):
            raise InferAlignerError("Mode 'aligned' returns plain token tensors and takes text prompts only.")
        streamer = inputs.pop("streamer", None)
        delegated = [i for i, row in enumerate(plan) if row.action is Action.DELEGATE]
        groups = [(self.aligned_model, delegated), (self.model, [i for i in range(len(plan)) if i not in delegated])]
        groups = [(model, rows) for model, rows in groups if rows]
        if streamer is not None and len(groups) > 1:
            raise InferAlignerError("Streaming works one prompt at a time.")
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pieces = {}
        for model, rows in groups:
            sub = {**inputs, "input_ids": input_ids[rows], "attention_mask": mask[rows], "streamer": streamer}
            with self.steered(plan.select(rows)):
                pieces[tuple(rows)] = _sequences(model.generate(**sub))[:, input_ids.shape[1] :]  # type: ignore[union-attr]
        width = max(piece.shape[1] for piece in pieces.values())
        new = input_ids.new_full((len(plan), width), inputs.get("pad_token_id", self.tokenizer.pad_token_id))
        for rows, piece in pieces.items():
            new[list(rows), : piece.shape[1]] = piece
        return torch.cat([input_ids, new], dim=1)

    def _answer_ids(self, answer: str, inputs: dict[str, Any]) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return ids[: inputs.get("max_new_tokens") or len(ids)]

    def answer(
        self,
        prompts: Sequence[str],
        batch: dict[str, torch.Tensor],
        *,
        max_new_tokens: int,
        plan: Plan | None = None,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Completions of one encoded batch (from `encode`, or an image-text processor) of these prompts, planned by
        the gate or as `plan` says."""
        output, plan = self.generate(
            **batch, max_new_tokens=max_new_tokens, plan=plan, return_plan=True, **generate_kwargs
        )
        new = _sequences(output)[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [
            Completion(prompt, text.strip(), row.gate, row.intervened)
            for prompt, text, row in zip(prompts, texts, plan, strict=True)
        ]

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        progress: bool = False,
        plan: Plan | None = None,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Answer user instructions (chat-formatted here), greedy unless sampling is asked for; each row as the gate
        decides, or as `plan` (one row per prompt) says."""
        if plan is not None and len(plan) != len(prompts):
            raise InferAlignerError(f"A plan for {len(plan)} rows was given for {len(prompts)} prompts.")
        generate_kwargs.setdefault("do_sample", False)
        results: list[Completion] = []
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
            chunk = list(prompts[start : start + batch_size])
            batch = self.encode(chunk, max_new_tokens)
            rows = plan.select(range(start, start + len(chunk))) if plan is not None else None
            results += self.answer(chunk, batch, max_new_tokens=max_new_tokens, plan=rows, **generate_kwargs)
        return results

    def stream(
        self, prompt: str, *, max_new_tokens: int = 256, **generate_kwargs: Any
    ) -> tuple[RowPlan, Iterator[str]]:
        """The plan for `prompt` (gate decision, action) and an iterator over the answer's text pieces as they are
        generated."""
        batch = self.encode([prompt], max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_kwargs.setdefault("do_sample", False)
        planned: list[Plan] = []
        known = threading.Event()

        def on_plan(plan: Plan) -> None:
            planned.append(plan)
            known.set()

        kwargs = {**batch, "max_new_tokens": max_new_tokens, "streamer": streamer, "on_plan": on_plan}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(**kwargs, **generate_kwargs)
            except BaseException as exc:  # surfaced to the caller (now, or after the stream ends)
                errors.append(exc)
                streamer.end()
            finally:
                known.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        known.wait()
        if not planned:
            thread.join()
            raise errors[0]
        plan = planned[0]

        def pieces() -> Iterator[str]:
            yield from streamer
            thread.join()
            if errors:
                raise errors[0]

        return plan[0], pieces()


def _check_parts(
    model: PreTrainedModel,
    mode: Mode,
    target: SafetyVectors | None,
    aligned: SafetyVectors | None,
    aligned_model: PreTrainedModel | None,
) -> None:
    """Raise a one-line error unless the mode has what it needs and every part fits the model and the others."""
    if mode.gated and target is None:
        raise InferAlignerError(f"Mode '{mode.value}' needs the target's own vectors (--target-vectors).")
    if mode in (Mode.INFERALIGNER, Mode.ALWAYS) and aligned is None:
        raise InferAlignerError(f"Mode '{mode.value}' needs the aligned model's vectors (--aligned-vectors).")
    if mode is Mode.ALIGNED and aligned_model is None:
        raise InferAlignerError("Mode 'aligned' needs the aligned model itself (--aligned-model).")
    if aligned_model is not None and model_fingerprint(aligned_model) != model_fingerprint(model):
        raise VectorMismatchError(
            "The aligned model's shape or vocabulary differs from the target's: it must be a "
            "fine-tune of the same base, sharing the tokenizer."
        )
    for vectors, role in ((target, "target vectors"), (aligned, "aligned vectors")):
        if vectors is not None:
            vectors.check_fits(model, role)
            vectors.check_finite(role)
    if target is not None and target.fitted:
        raise VectorFileError(
            f"The target vectors define the gate and must come from `extract` on the target, but "
            f"they hold {target.describe_kind()}: pass those as steering vectors."
        )
    if target is not None and aligned is not None:
        aligned.check_compatible(target, ("aligned", "target"))
        if mode in (Mode.INFERALIGNER, Mode.ALWAYS) and aligned.is_own_gate_of(target):
            raise VectorMismatchError(
                f"The steering vectors are the target's own ({aligned.describe_kind()}): "
                "steer with the aligned model's vectors, or use mode 'self' for this "
                "ablation."
            )


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
