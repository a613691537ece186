"""Pairwise judges for win rates between model stages.

Two judges, one result shape (the keys of :func:`llm_core.evaluate.reward_win_rate` plus the
order figures):

* :func:`reward_judge`: the trained reward model. It is *pointwise*: each (prompt, reply) gets a
  scalar on its own, so the order in which two replies are shown cannot matter by construction.
  Both orders are still scored (as separate, differently-batched calls) and the share of prompts
  whose verdict survives the swap is reported as ``order_agreement``: anything below 1.0 means
  the scores depend on batching or padding, a bug rather than a preference.
* :func:`http_judge`: an optional OpenAI-compatible chat endpoint (``$JUDGE_URL``, off by default).
  An LLM judge does have a position bias, so every pair is asked twice with the replies swapped;
  a reply wins only when both orders pick it, a split verdict is a tie, and ``order_agreement``
  is the share of pairs where the two orders agreed.

The judge's credentials (``$JUDGE_API_KEY``, or ``user:key@`` in ``$JUDGE_URL``) never leave this
module: :func:`redact_url` strips them from every URL that is logged or reported, and an error
body (which a server may use to echo the key back) is reported with the secrets blanked out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import requests

from llm_core.evaluate import REWARD_TIE_TOLERANCE, reward_win_rate

Messages = list[dict[str, str]]
ScoreFn = Callable[[Sequence[Messages], Sequence[str]], np.ndarray]

JUDGE_URL_ENV = "JUDGE_URL"
JUDGE_MODEL_ENV = "JUDGE_MODEL"
JUDGE_API_KEY_ENV = "JUDGE_API_KEY"
JUDGE_SYSTEM = (
    "You compare two assistant replies to the same user request. Judge helpfulness, correctness "
    "and clarity. Answer with a single letter: A if reply A is better, B if reply B is better."
)
_VERDICT = re.compile(r"\b([AB])\b")


TIE_TOLERANCE = REWARD_TIE_TOLERANCE
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` without ``user:password@`` (the host and port stay, so the report still says
    which judge it was)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret (and its percent-decoded form) blanked out."""
    for secret in secrets:
        for form in {secret, unquote(secret)} if secret else ():
            if len(form) >= 3:
                text = text.replace(form, REDACTED)
    return text


def url_secrets(url: str) -> tuple[str | None, str | None]:
    """The user name and password embedded in ``url`` (None where absent)."""
    parts = urlsplit(url)
    return parts.username, parts.password


def _verdicts(a_minus_b: np.ndarray) -> np.ndarray:
    return np.where(np.abs(a_minus_b) <= TIE_TOLERANCE, 0.0, np.sign(a_minus_b))


def reward_judge(
    score: ScoreFn, prompts: Sequence[Messages], replies_a: Sequence[str], replies_b: Sequence[str]
) -> dict[str, Any]:
    """Win rate of ``replies_a`` over ``replies_b`` by reward (``score(prompts, replies)``).

    Shown as (a, b) the rewards are scored in one call over ``a + b``; swapped, over ``b + a``.
    """
    n = len(prompts)
    if not len(replies_a) == len(replies_b) == n:
        raise ValueError(f"{n} prompts but {len(replies_a)} and {len(replies_b)} replies")
    both = [*prompts, *prompts]
    first = np.asarray(score(both, [*replies_a, *replies_b]), dtype=np.float64)
    second = np.asarray(score(both, [*replies_b, *replies_a]), dtype=np.float64)
    ra, rb = first[:n], first[n:]
    rb2, ra2 = second[:n], second[n:]
    result = reward_win_rate(ra, rb, tie_tolerance=TIE_TOLERANCE)
    swapped = reward_win_rate(rb2, ra2, tie_tolerance=TIE_TOLERANCE)
    agree = _verdicts(ra - rb) == _verdicts(ra2 - rb2)
    return {
        **result,
        "judge": "reward_model",
        "pointwise": True,
        "swapped_win_rate": 1.0 - swapped["win_rate"] if n else float("nan"),
        "order_agreement": float(agree.mean()) if n else float("nan"),
        "mean_reward_a": float(ra.mean()) if n else float("nan"),
        "mean_reward_b": float(rb.mean()) if n else float("nan"),
    }


def judge_prompt(prompt: Messages, reply_a: str, reply_b: str) -> str:
    """The user message shown to an LLM judge for one ordered pair."""
    convo = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return (
        f"[Conversation]\n{convo}\n\n[Reply A]\n{reply_a}\n\n[Reply B]\n{reply_b}\n\n"
        "Which reply is better? Answer A or B."
    )


def parse_verdict(text: str) -> str | None:
    """``"A"`` or ``"B"``: the first standalone letter of the judge's answer, else None."""
    m = _VERDICT.search(text or "")
    return m.group(1) if m else None


def ask_judge(
    session: requests.Session,
    url: str,
    model: str,
    content: str,
    *,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> str:
    """One chat completion from an OpenAI-compatible endpoint (``<url>/chat/completions``)."""
    endpoint = f"{url.rstrip('/')}/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": content},
        ],
        "temperature": 0,
        "max_tokens": 4,
    }
    shown = redact_url(endpoint)
    secrets = (api_key, *url_secrets(url))
    try:
        response = session.post(endpoint, json=body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:  # its text holds the URL, credentials included
        raise RuntimeError(f"judge {shown}: {redact(str(exc), *secrets)}") from None
    if response.status_code != 200:
        echoed = redact(response.text[:200], *secrets)
        raise RuntimeError(f"judge {shown}: HTTP {response.status_code}: {echoed}")
    try:
        return str(response.json()["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"judge {shown}: not an OpenAI chat completion: {exc}") from exc


def http_judge(
    url: str,
    prompts: Sequence[Messages],
    replies_a: Sequence[str],
    replies_b: Sequence[str],
    *,
    model: str,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Win rate of ``replies_a`` over ``replies_b`` by an external judge, both orders asked."""
    n = len(prompts)
    if not len(replies_a) == len(replies_b) == n:
        raise ValueError(f"{n} prompts but {len(replies_a)} and {len(replies_b)} replies")
    outcome = np.full(n, 0.5)  # 1: a wins in both orders, 0: b wins in both, 0.5: split/unclear
    agree = np.zeros(n, dtype=bool)
    unparsed = 0
    with requests.Session() as session:
        for i, (p, a, b) in enumerate(zip(prompts, replies_a, replies_b, strict=True)):
            first = parse_verdict(
                ask_judge(
                    session, url, model, judge_prompt(p, a, b), api_key=api_key, timeout=timeout
                )
            )
            second = parse_verdict(
                ask_judge(
                    session, url, model, judge_prompt(p, b, a), api_key=api_key, timeout=timeout
                )
            )
            unparsed += (first is None) + (second is None)
            winner_first = {"A": "a", "B": "b"}.get(first or "")
            winner_second = {"A": "b", "B": "a"}.get(second or "")
            agree[i] = winner_first is not None and winner_first == winner_second
            if agree[i]:
                outcome[i] = 1.0 if winner_first == "a" else 0.0
    result = reward_win_rate(outcome, 1.0 - outcome)
    return {
        **result,
        "judge": f"http:{model}",
        "pointwise": False,
        "order_agreement": float(agree.mean()) if n else float("nan"),
        "unparsed_verdicts": unparsed,
    }
