"""A plain, seeded LoRA supervised fine-tuning loop (peft), loss on the assistant's answer only."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inferaligner.prompts import format_chat

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one LoRA fine-tuning run."""

    epochs: float = 1.0
    batch_size: int = 8
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    rank: int = 8
    lora_alpha: int = 16
    dropout: float = 0.05
    max_length: int = 320
    max_steps: int | None = None  # cut the run short (tests)
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int
    final_loss: float
    seconds: float


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, instruction: str, answer: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Input ids and labels for one chat turn: the prompt part is masked with -100, the answer ends with EOS."""
    prompt = tokenizer(format_chat(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + reply)[:max_length]
    labels = ([-100] * len(prompt) + reply)[:max_length]
    return ids, labels


def lora_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    config: TrainConfig,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[PeftModel, TrainResult]:
    """Wrap `model` with a fresh LoRA adapter on every linear projection (of the decoder blocks in `layers`, all
    by default) and train it on (instruction, answer) pairs. Returns the peft model (base weights frozen) and a
    summary."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    targets = [name for name in LORA_TARGETS if any(n.endswith(name) for n, _ in model.named_modules())]
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        layers_to_transform=list(layers) if layers is not None else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    data = [tokenize_example(tokenizer, q, a, config.max_length) for q, a in examples]
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.max_steps or max(1, round(steps_per_epoch * config.epochs))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) * max(0.0, 1 - step / total)
    )
    order: list[int] = []
    pad = tokenizer.pad_token_id
    peft_model.train()
    started, loss_ema = time.perf_counter(), float("nan")
    bar = tqdm(range(total), desc="fine-tuning", disable=not progress)
    for _step in bar:
        if len(order) < config.batch_size:
            order += random.sample(range(len(data)), len(data))
        batch = [data[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * value
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    peft_model.eval()
    return peft_model, TrainResult(total, len(data), round(loss_ema, 4), round(time.perf_counter() - started, 1))
