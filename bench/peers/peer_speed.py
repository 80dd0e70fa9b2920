"""Generation-speed overhead of a third-party steering library ("peer") against plain ``model.generate``.

Standalone: it does not import inferaligner and runs inside the peer's own virtual environment, made by
``bench/peers/setup_envs.sh`` (``.bench-venvs/steering-vectors`` and ``.bench-venvs/repeng``). Example::

    bash bench/peers/setup_envs.sh
    .bench-venvs/repeng/bin/python bench/peers/peer_speed.py --peer repeng \\
        --model ~/.cache/inferaligner/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f \\
        --vectors directions.safetensors --layers 10 11 12 --alpha 4 \\
        --batch-sizes 1 8 --new-tokens 64 --repeats 10 --threads 2 --out peer_repeng.json

``--vectors`` is a safetensors file whose tensor ``directions`` has shape [num_layers, hidden] (float32). The
"peer" method is greedy generation while the library adds ``alpha * directions[l]`` to the output of decoder
block ``l`` (the residual stream) for each ``l`` in ``--layers``. "plain" is the same ``model.generate`` call
with no steering. Per batch size: one untimed warm-up of each method, then ``--repeats`` rounds that run both
methods in alternating order, timed with ``time.perf_counter`` (wall) and ``time.process_time`` (CPU).

Before timing, two untimed checks run per batch size: the peer's last-position logits must equal those of a
reference hook written here (so the peer steers exactly the given layers, vectors and coefficient), and the
peer's greedy tokens must differ from plain ones (``steers``).

What the timed "peer" call contains: steering-vectors: ``with vector.apply(model, ...)`` around
``generate`` (hooks are added and removed per call, as that API is meant to be used); repeng: the model is
wrapped in ``ControlModel`` outside the timed region, and the timed call is ``set_control``, ``generate``,
``reset``; the wrap is undone before each plain call so that "plain" is the bare model.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

DEFAULT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "Write a short poem about the sea.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Suggest a name for a small coffee shop.",
]
TF_MAJOR = int(transformers.__version__.split(".")[0])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, choices=["steering-vectors", "repeng"])
    p.add_argument("--model", required=True, type=Path, help="local HF safetensors (Llama) folder")
    p.add_argument("--vectors", required=True, type=Path, help="safetensors with 'directions' [layers, hidden]")
    p.add_argument("--layers", required=True, type=int, nargs="+")
    p.add_argument("--alpha", required=True, type=float)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--prompt-file", type=Path, help="JSON list of strings (default: a few built-in prompts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args()


def load_tokenizer(model_dir: Path):
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError, AttributeError) as exc:
        # A folder written by transformers 5 names tokenizer_class "TokenizersBackend", unknown to 4.x.
        print(f"AutoTokenizer failed ({type(exc).__name__}: {exc}); building PreTrainedTokenizerFast")
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {k: cfg[k] for k in names if isinstance(cfg.get(k), str)}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special)
        if cfg.get("chat_template"):
            tok.chat_template = cfg["chat_template"]
    template_file = model_dir / "chat_template.jinja"
    if not tok.chat_template and template_file.exists():
        tok.chat_template = template_file.read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(model_dir: Path):
    config = AutoConfig.from_pretrained(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.get("rope_parameters")
    if TF_MAJOR < 5 and isinstance(rope, dict) and "rope_theta" not in raw:
        # transformers 5 writes rope settings as "rope_parameters"; 4.x would silently fall back to its default
        # rope_theta (10000) and compute different logits, so carry the values over.
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
        print(f"config: rope_parameters -> rope_theta={config.rope_theta}")
    dtype_kw = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **{dtype_kw: torch.float32})
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@contextmanager
def reference_steering(model, vectors: dict[int, torch.Tensor], alpha: float):
    """Own forward hooks adding alpha * v to each steered block's output: the ground truth for the check."""

    def make_hook(delta: torch.Tensor):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        return hook

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(make_hook(alpha * v)) for i, v in vectors.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SteeringVectorsPeer:
    name = "steering-vectors"

    def __init__(self, model, vectors: dict[int, torch.Tensor], alpha: float):
        from steering_vectors import SteeringVector

        self.model, self.alpha = model, alpha
        self.vector = SteeringVector(layer_activations=dict(vectors), layer_type="decoder_block")
        # Name the blocks explicitly rather than relying on the library's guess from module names.
        self.layer_config = {"decoder_block": "model.layers.{num}"}
        self.version = version("steering-vectors")

    @contextmanager
    def steering(self):
        # min_token_index=0 (the default) patches every position of every row, left padding included.
        with self.vector.apply(self.model, layer_config=self.layer_config, multiplier=self.alpha, min_token_index=0):
            yield

    def prepare(self) -> None:
        pass

    def release(self) -> None:
        pass


class RepengPeer:
    name = "repeng"

    def __init__(self, model, vectors: dict[int, torch.Tensor], alpha: float):
        from repeng import ControlVector

        self.model, self.alpha = model, alpha
        self.layer_ids = sorted(vectors)
        directions = {i: v.numpy() for i, v in vectors.items()}
        self.vector = ControlVector(model_type=model.config.model_type, directions=directions)
        self.control_model = None
        self.version = version("repeng")

    def prepare(self) -> None:
        """Wrap the steered blocks (ControlModel mutates the model in place); untimed."""
        from repeng import ControlModel

        if self.control_model is None:
            self.control_model = ControlModel(self.model, self.layer_ids)

    def release(self) -> None:
        """Undo the wrap so that plain generation runs on the bare model; untimed."""
        if self.control_model is not None:
            self.control_model.unwrap()
            self.control_model = None

    @contextmanager
    def steering(self):
        # repeng adds the control at every position except left padding (found from position_ids == 0).
        self.control_model.set_control(self.vector, coeff=self.alpha)
        try:
            yield
        finally:
            self.control_model.reset()


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    directions = load_file(str(args.vectors))["directions"].to(torch.float32)
    if tuple(directions.shape) != (n_layers, hidden):
        raise SystemExit(f"directions shape {tuple(directions.shape)} != ({n_layers}, {hidden})")
    if len(set(args.layers)) != len(args.layers) or not all(0 <= i < n_layers for i in args.layers):
        raise SystemExit(f"--layers must be distinct and in [0, {n_layers})")
    vectors = {i: directions[i].clone() for i in args.layers}

    peer_cls = {"steering-vectors": SteeringVectorsPeer, "repeng": RepengPeer}[args.peer]
    peer = peer_cls(model, vectors, args.alpha)

    prompts = json.loads(args.prompt_file.read_text()) if args.prompt_file else DEFAULT_PROMPTS
    n_new = args.new_tokens
    gen_kwargs = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id)

    def batch_inputs(b: int):
        chats = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(b)]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # no token_type_ids

    def run(method: str, inputs):
        """One timed call; the untimed repeng wrap/unwrap (prepare/release) happens before the clocks start."""
        if method == "plain":
            peer.release()
            return timed(lambda: model.generate(**inputs, **gen_kwargs))
        peer.prepare()

        def steered():
            with peer.steering():
                return model.generate(**inputs, **gen_kwargs)

        return timed(steered)

    def checked(out, inputs):
        got = out.shape[1] - inputs["input_ids"].shape[1]
        assert got == n_new, f"generated {got} new tokens, expected {n_new}"
        return out

    print(
        f"peer={peer.name} {peer.version} transformers={transformers.__version__} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} layers={args.layers} alpha={args.alpha}"
    )
    batches = []
    for b in args.batch_sizes:
        inputs = batch_inputs(b)
        # Same position_ids as generate() builds for left padding; repeng needs them per row (without them,
        # transformers passes [1, seq] position_ids and repeng's padding mask fails on a batch > 1).
        mask = inputs["attention_mask"]
        check_inputs = {**inputs, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}
        with torch.no_grad():
            # Untimed check 1: the peer's steering equals the reference hooks (same layers, vectors, coefficient).
            peer.release()
            plain_logits = model(**check_inputs).logits[:, -1]
            with reference_steering(model, vectors, args.alpha):
                ref_logits = model(**check_inputs).logits[:, -1]
            peer.prepare()
            with peer.steering():
                peer_logits = model(**check_inputs).logits[:, -1]
        max_diff = (peer_logits - ref_logits).abs().max().item()
        matches = max_diff < 1e-3 * max(1.0, ref_logits.abs().max().item())
        logit_shift = (peer_logits - plain_logits).abs().max().item()

        # Warm-up of each method; their outputs give untimed check 2 (steered tokens differ from plain).
        plain_tokens = checked(run("plain", inputs)[2], inputs)
        peer_tokens = checked(run("peer", inputs)[2], inputs)
        steers = not torch.equal(plain_tokens, peer_tokens)
        rows_changed = int((plain_tokens != peer_tokens).any(dim=1).sum())
        print(
            f"[batch {b}] check: peer vs reference logits max|diff|={max_diff:.2e} matches={matches}; "
            f"peer vs plain logits max|diff|={logit_shift:.3f}; steers={steers} ({rows_changed}/{b} rows changed)"
        )

        rec = {"batch": b, "plain_wall": [], "peer_wall": [], "plain_cpu": [], "peer_cpu": [], "order": []}
        for r in range(args.repeats):
            order = ["plain", "peer"] if r % 2 == 0 else ["peer", "plain"]
            for method in order:
                wall, cpu, out = run(method, inputs)
                checked(out, inputs)
                rec[f"{method}_wall"].append(wall)
                rec[f"{method}_cpu"].append(cpu)
            rec["order"].append(order)
        peer.release()
        rec.update(steers=steers, matches_reference=matches, reference_max_abs_diff=max_diff)
        pw, sw = sorted(rec["plain_wall"]), sorted(rec["peer_wall"])
        if pw:
            med_p, med_s = pw[len(pw) // 2], sw[len(sw) // 2]
            print(f"[batch {b}] median wall plain={med_p:.3f}s peer={med_s:.3f}s ratio={med_s / med_p:.3f}")
        batches.append(rec)

    result = {
        "peer": peer.name,
        "peer_version": peer.version,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "new_tokens": n_new,
        "model": str(args.model),
        "layers": args.layers,
        "alpha": args.alpha,
        "repeats": args.repeats,
        "batches": batches,
        "steers": all(rec["steers"] for rec in batches),
        "matches_reference": all(rec["matches_reference"] for rec in batches),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"steers={result['steers']} matches_reference={result['matches_reference']} -> {args.out}")


if __name__ == "__main__":
    main()
