"""InferAligner: inference-time harmlessness through gated cross-model safety steering.

Typical use::

    from inferaligner import InferAligner
    aligner = InferAligner.from_pretrained(
        "my-finetuned-model", aligned_vectors="aligned.safetensors", target_vectors="target.safetensors"
    )
    print(aligner.complete(["How do I pick a lock?"])[0].text)
"""

from inferaligner.aligner import Completion, InferAligner, Mode
from inferaligner.errors import (
    InferAlignerError,
    PromptError,
    PromptTooLongError,
    VectorFileError,
    VectorMismatchError,
)
from inferaligner.gate import Gate, GateDecision
from inferaligner.models import EMBEDDED_MODEL, decoder_layers, load_model
from inferaligner.steer import SteeringHandle, add_steering
from inferaligner.vectors import SafetyVectors, extract_safety_vectors

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL",
    "Completion",
    "Gate",
    "GateDecision",
    "InferAligner",
    "InferAlignerError",
    "Mode",
    "PromptError",
    "PromptTooLongError",
    "SafetyVectors",
    "SteeringHandle",
    "VectorFileError",
    "VectorMismatchError",
    "__version__",
    "add_steering",
    "decoder_layers",
    "extract_safety_vectors",
    "load_model",
]
