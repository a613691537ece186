"""HumanEval: functional correctness of generated Python, pass@1 and pass@k.

Each problem is a function signature with its docstring (``prompt``) and a ``check`` function
(``test``). A base model continues the prompt as plain text, cut at the first line that starts a
new top-level block (Codex's stop sequences); a chat model gets the prompt as a user turn and its
reply's first fenced code block (else the whole reply) is used: a reply that defines the
function replaces the stub, one that does not is read as the stub's body. The program
``prompt + completion + test + check(entry_point)`` runs in :mod:`pipeline.eval.sandbox`; a
problem is solved when it exits 0.

With ``n`` samples per problem of which ``c`` pass, pass@k is the unbiased estimator of Chen et
al. (2021), ``1 - C(n-c, k) / C(n, k)``, averaged over problems; ``n = 1`` (greedy) gives pass@1.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm_core.evaluate import wilson_interval
from pipeline.eval.sandbox import SandboxLimits, describe, network_isolation, run_programs
from pipeline.eval.sets import Loaded, _blank, _read, _split_valid, subset
from pipeline.eval.settings import HumanEvalSettings

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ")
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)
EXAMPLES = 2


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` of ``n`` samples correct (Chen et al. 2021),
    as a numerically stable product instead of a ratio of huge binomials."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c ({c}) <= n ({n}) and 1 <= k ({k}) <= n")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_humaneval(files: Sequence[Path], n: int, seed: int) -> Loaded:
    """Problems (``task_id``, ``prompt``, ``test``, ``entry_point``)."""
    raw = _read(files, "humaneval", ["task_id", "prompt", "test", "entry_point"])
    reason = (
        pl.when(_blank("prompt"))
        .then(pl.lit("empty prompt"))
        .when(_blank("test") | _blank("entry_point"))
        .then(pl.lit("no test or entry point"))
    )
    valid, rejects = _split_valid("humaneval", raw, reason)
    return Loaded(subset(valid, n, seed), rejects, valid.height)


def truncate_completion(text: str) -> str:
    """A base model's continuation up to the first stop sequence (a new top-level block)."""
    cut = min((i for s in STOP if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def program(prompt: str, completion: str, test: str, entry_point: str, *, chat: bool) -> str:
    """The file the sandbox runs for one completion."""
    if chat:
        fenced = _FENCE.search(completion)
        code = fenced.group(1) if fenced else completion
        if re.search(rf"^def {re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            # The prompt's stub is a complete function (its body is the docstring): redefining
            # it keeps the prompt's imports and helpers.
            body = f"{prompt}\n    pass\n\n{code}"
        else:
            body = prompt + code
    else:
        body = prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def completions(
    model: Any, tok: Any, prompts: Sequence[str], s: HumanEvalSettings, *, chat: bool, seed: int,
    batch_size: int,
) -> list[list[str]]:  # fmt: skip
    """``s.samples`` completions per prompt (greedy when 1), prompts cut on the left to leave
    room for ``max_new_tokens`` in the window."""
    from llm_core.generate import chat_replies, generate
    from llm_core.tokenizer import EOT

    greedy = s.samples == 1
    temperature = 0.0 if greedy else s.temperature
    flat = [p for p in prompts for _ in range(s.samples)]
    if chat:
        texts = chat_replies(
            model, tok, [[{"role": "user", "content": p}] for p in flat], s.max_new_tokens,
            temperature=temperature, seed=seed, batch_size=batch_size,
        )  # fmt: skip
    else:
        ctx = int(model.config.context_length)
        keep = max(ctx - s.max_new_tokens, ctx // 2)
        ids = [e.ids[-keep:] for e in tok.encode_batch(list(flat), add_special_tokens=False)]
        stops = [t for t in (tok.token_to_id(EOT),) if t is not None]
        texts = []
        for j, i in enumerate(range(0, len(ids), batch_size)):
            new = generate(
                model, ids[i : i + batch_size], s.max_new_tokens, temperature=temperature,
                stop_ids=stops, seed=seed + j, pad_id=0,
            )  # fmt: skip
            texts += [truncate_completion(tok.decode(r, skip_special_tokens=True)) for r in new]
    return [texts[i : i + s.samples] for i in range(0, len(texts), s.samples)]


def humaneval_scores(
    model: Any, tok: Any, items: pl.DataFrame, s: HumanEvalSettings, *, chat: bool, seed: int,
    batch_size: int,
) -> dict[str, Any]:  # fmt: skip
    """pass@1 (and pass@k for each configured ``k <= samples``) with the sandbox's limits."""
    limits = SandboxLimits(
        timeout_s=s.timeout_s, cpu_s=s.cpu_s, memory_mb=s.memory_mb, workers=s.workers
    )
    network = network_isolation()
    rows = list(items.iter_rows(named=True))
    samples = completions(
        model, tok, [r["prompt"] for r in rows], s, chat=chat, seed=seed, batch_size=batch_size
    )
    sources = [
        program(r["prompt"], c, r["test"], r["entry_point"], chat=chat)
        for r, cs in zip(rows, samples, strict=True)
        for c in cs
    ]
    outcomes = run_programs(sources, limits, network)
    n = s.samples
    passed = np.array([o.passed for o in outcomes], dtype=bool).reshape(len(rows), n)
    correct = passed.sum(axis=1)
    ks = sorted({k for k in (1, *s.k) if k <= n})
    pass_k = {
        f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct])) if rows else 0.0
        for k in ks
    }
    # pass@1 over problems: an average of per-problem fractions; its Wilson interval counts
    # problems (n samples of one problem are not independent trials).
    solved = float(pass_k["pass@1"] * len(rows))
    examples = [
        {"task_id": r["task_id"], "completion": cs[0][:600], "status": outcomes[i * n].status,
         "stderr_tail": outcomes[i * n].stderr_tail[-200:]}
        for i, (r, cs) in enumerate(zip(rows, samples, strict=True))
    ][:EXAMPLES]  # fmt: skip
    return {
        "accuracy": pass_k["pass@1"],
        "ci95": wilson_interval(solved, len(rows)),
        "n": len(rows),
        "correct": int((correct > 0).sum()),
        "chance": 0.0,
        **pass_k,
        "samples_per_problem": n,
        "temperature": 0.0 if n == 1 else s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "outcomes": dict(Counter(o.status for o in outcomes)),
        "sandbox": describe(limits, network),
        "sandbox_seconds": round(sum(o.seconds for o in outcomes), 3),
        "template": "chat" if chat else "plain",
        "method": "program = prompt + completion + test + check(entry_point) exits 0 in the sandbox",
        "examples": examples,
    }
