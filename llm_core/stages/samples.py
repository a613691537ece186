"""Fixed prompts answered after a stage, so runs can be compared side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SAMPLE_PROMPTS = (
    "It was a dark and stormy night",
    "The old man looked at the sea and said",
    "Once upon a time there lived a king who",
)
# Fixed chat prompts, answered greedily after SFT so runs can be compared side by side.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "Write a Python function that returns the square of a number.",
)


def sample_continuations(
    weights_dir: Path, tokenizer_path: Path, n_new: int = 40
) -> dict[str, str]:
    """Continuations of fixed prompts, sampled with a fixed seed so reruns are comparable."""
    from llm_core.checkpoint import load_weights
    from llm_core.generate import generate
    from llm_core.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    model = load_weights(weights_dir).eval()
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False).ids[-model.config.context_length :]
        new = generate(
            model, ids, n_new, temperature=0.8, top_k=50, stop_ids=(tok.token_to_id(EOT),), seed=0
        )[0]
        out[prompt] = tok.decode(new, skip_special_tokens=True)
    return out


def chat_answers(
    weights_dir: Path, tokenizer_path: Path, prompts: Sequence[str] = CHAT_PROMPTS, n_new: int = 48
) -> dict[str, str]:
    """Greedy answers of the chat model to fixed single-turn prompts (one batched generate)."""
    from llm_core.checkpoint import load_weights
    from llm_core.generate import chat_replies
    from llm_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    model = load_weights(weights_dir).eval()
    messages = [[{"role": "user", "content": p}] for p in prompts]
    answers = chat_replies(model, tok, messages, n_new, batch_size=len(messages))
    return {p: a or "(no text)" for p, a in zip(prompts, answers, strict=True)}
