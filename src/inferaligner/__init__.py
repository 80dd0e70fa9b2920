"""InferAligner: inference-time harmlessness through gated cross-model safety steering.

Typical use::

    from inferaligner import InferAligner
    aligner = InferAligner.from_pretrained(
        "my-finetuned-model", aligned_vectors="aligned.safetensors", target_vectors="target.safetensors"
    )
    print(aligner.complete(["How do I pick a lock?"])[0].text)
"""

from inferaligner import zoo  # noqa: F401 (registers the demo models' names, `zoo:NAME`, with `load`)
from inferaligner.aligner import Completion, InferAligner
from inferaligner.errors import (
    InferAlignerError,
    PromptError,
    PromptTooLongError,
    VectorFileError,
    VectorMismatchError,
)
from inferaligner.gate import Gate, GateDecision
from inferaligner.loading import Loaded, load, load_model
from inferaligner.models import EMBEDDED_MODEL, decoder_layers
from inferaligner.plan import Action, Plan, RowPlan
from inferaligner.settings import AlignerSettings, Mode, SteeringSettings, SteerScale
from inferaligner.steer import SteeringHandle, add_steering
from inferaligner.vectors import SafetyVectors, extract_safety_vectors
from inferaligner.version import __version__

__all__ = [
    "EMBEDDED_MODEL",
    "Action",
    "AlignerSettings",
    "Completion",
    "Gate",
    "GateDecision",
    "InferAligner",
    "InferAlignerError",
    "Loaded",
    "Mode",
    "Plan",
    "PromptError",
    "PromptTooLongError",
    "RowPlan",
    "SafetyVectors",
    "SteerScale",
    "SteeringHandle",
    "SteeringSettings",
    "VectorFileError",
    "VectorMismatchError",
    "__version__",
    "add_steering",
    "decoder_layers",
    "extract_safety_vectors",
    "load",
    "load_model",
]
