"""Image-text models (LLaVA, LLaVA-NeXT and other decoders with a vision tower): InferAligner on the language model.

The processor wraps each image + question in the model's chat template; the gate is read at the last token of
that multimodal prompt (image tokens included) and steering hooks sit on the language model's blocks only, so the
vision tower and projector run unchanged. Safety vectors come from a text-only model of the same language-model
family, or from the image-text model itself on text prompts (the vector file says which).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from inferaligner.aligner import Completion, InferAligner
from inferaligner.errors import InferAlignerError
from inferaligner.models import has_vision

ImageInput = str | os.PathLike[str] | Image.Image | None


class ImageError(InferAlignerError):
    """An image could not be read, or was given to a model that cannot see."""


def load_image(source: ImageInput) -> Image.Image:
    """An RGB image from a path (or an already opened image)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(str(source))
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"Cannot read image {path}: {exc.__class__.__name__}. Give a JPEG, PNG or WebP file.") from exc


class MultimodalAligner:
    """An `InferAligner` whose prompts may carry an image each, formatted by the model's processor.

    `prompt_template` (with `{prompt}` and, for images, `<image>`) replaces the processor's chat template, for
    processors that have none.
    """

    def __init__(self, aligner: InferAligner, processor: Any, prompt_template: str | None = None) -> None:
        if prompt_template is None and not getattr(processor, "chat_template", None):
            raise InferAlignerError(
                "This processor has no chat template: pass prompt_template (CLI --prompt-template), e.g. "
                "'USER: <image>\\n{prompt} ASSISTANT:'."
            )
        self.aligner, self.processor, self.prompt_template = aligner, processor, prompt_template

    def format(self, prompt: str, with_image: bool) -> str:
        if self.prompt_template is not None:
            text = self.prompt_template.format(prompt=prompt)
            return text if with_image else text.replace("<image>\n", "").replace("<image>", "")
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        system = self.aligner.settings.system
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, prompts: Sequence[str], images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch; `images[i]` (or None) goes with `prompts[i]`."""
        if len(images) != len(prompts):
            raise InferAlignerError(f"{len(prompts)} prompts but {len(images)} images: give one image (or None) each.")
        pictures = [load_image(image) for image in images if image is not None]
        if pictures and not has_vision(self.aligner.model):
            name = getattr(self.aligner.model, "name_or_path", "") or "this model"
            raise ImageError(f"{name} is a text-only model and cannot take images; use an image-text model.")
        texts = [self.format(p, image is not None) for p, image in zip(prompts, images, strict=True)]
        batch = self.processor(text=texts, images=pictures or None, return_tensors="pt", padding=True)
        return {key: value.to(self.aligner.device) for key, value in batch.items()}

    def complete(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageInput],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Answers to image + text prompts, gated and steered per row as for text models."""
        generate_kwargs.setdefault("do_sample", False)
        results: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            chunk, pictures = list(prompts[start : start + batch_size]), list(images[start : start + batch_size])
            batch = self.encode(chunk, pictures)
            results += self.aligner.answer(chunk, batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        return results
