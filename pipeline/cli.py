"""``scriptorium`` console script.

Each subcommand is one ``_cmd_*`` function registered in :func:`build_parser`; heavy modules
(torch, the model code) must be imported inside those functions so ``scriptorium mirror wait``
stays instant and works in environments without a GPU stack.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pipeline import classify_cli, publish, run_view
from pipeline.serve import cli as serve_cli

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_MIRROR_PORT = 8765


def _cmd_mirror_serve(args: argparse.Namespace) -> int:
    """Serve a data mirror until SIGINT/SIGTERM (the Makefile runs this in the background)."""
    from pipeline.sources.mirror import MirrorServer

    root = Path(args.dir)
    if not root.is_dir():
        print(f"scriptorium mirror serve: {root} is not a directory", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    routes = []
    if args.writable:  # the Hub write API (scriptorium push against the mirror), opt-in
        from pipeline.sources.hub_write import hub_write_routes

        for kind in ("datasets", "models"):
            (root / "hf" / kind).mkdir(parents=True, exist_ok=True)
        routes = hub_write_routes(root)
    try:
        server = MirrorServer(root, host=args.host, port=args.port, routes=routes)
    except OSError as exc:  # port in use, bad host: a message, not a traceback
        print(
            f"scriptorium mirror serve: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            print(f"serving {root.resolve()} at {server.url}", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("mirror stopped", flush=True)
    return 0


def _cmd_mirror_wait(args: argparse.Namespace) -> int:
    """Exit 0 once the mirror answers HTTP, 1 after ``--timeout`` seconds."""
    from pipeline.sources.mirror import wait_until_up

    url = args.url or f"http://{args.host}:{args.port}/"
    try:
        wait_until_up(url, timeout=args.timeout)
    except TimeoutError as exc:
        print(f"scriptorium mirror wait: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_mirror(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mirror = subparsers.add_parser("mirror", help="serve or wait for the local data mirror")
    actions = mirror.add_subparsers(dest="action", required=True, metavar="ACTION")

    serve = actions.add_parser("serve", help="serve DIR (gutenberg/, files/, ...) over HTTP")
    serve.add_argument("dir", metavar="DIR", help="mirror root, e.g. ../shared/mirror")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_MIRROR_PORT, help="0 picks a free port")
    serve.add_argument(
        "--writable", action="store_true", help="accept Hub uploads into DIR/hf (for push tests)"
    )
    serve.set_defaults(func=_cmd_mirror_serve)

    wait = actions.add_parser("wait", help="block until the mirror answers")
    wait.add_argument("--host", default="127.0.0.1")
    wait.add_argument("--port", type=int, default=DEFAULT_MIRROR_PORT)
    wait.add_argument("--url", default=None, help="probe this URL instead of host:port")
    wait.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    wait.set_defaults(func=_cmd_mirror_wait)


def _resolve_tokenizer(weights: Path, explicit: str | None) -> Path:
    """The tokenizer beside the weights, else the data root's ``bpe_tokenizer`` artefact."""
    from pipeline.artefacts import Artefacts, data_root

    candidates = [Path(explicit)] if explicit else []
    candidates += [weights / "tokenizer.json", Artefacts(data_root()).tokenizer]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"no tokenizer.json beside {weights} or in $SCRIPTORIUM_DATA/bpe_tokenizer; pass --tokenizer"
    )


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags shared by ``generate`` and ``chat``, as ``stream`` keyword arguments."""
    return {
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


def _cmd_generate(args: argparse.Namespace) -> int:
    """Stream a continuation of PROMPT from a weights folder (``model.safetensors`` + config)."""
    from llm_core.checkpoint import load_weights
    from llm_core.generate import stream
    from llm_core.tokenizer import EOT, load_tokenizer

    weights = Path(args.weights)
    try:
        tok = load_tokenizer(_resolve_tokenizer(weights, args.tokenizer))
        model = load_weights(weights).eval()
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium generate: {exc}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    _stream_text(
        tok,
        stream(
            model,
            ids,
            args.max_new_tokens,
            stop_ids=(tok.token_to_id(EOT),),
            **_sampling(args),
        ),
    )
    return 0


def _add_generate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = subparsers.add_parser("generate", help="stream a continuation of a prompt")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--weights", required=True, help="folder with model.safetensors + config.json")
    gen.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside weights)")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)


def _fit_history(tok: Tokenizer, history: list[dict[str, str]], budget: int) -> list[int]:
    """Prompt ids for ``history`` within ``budget`` tokens: the oldest exchanges go first (a
    system message stays), and a single over-long turn keeps its end, the part just answered."""
    from llm_core.sft import encode_prompt

    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system) :]
    ids = encode_prompt(tok, [*system, *turns])
    while len(ids) > budget and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
        ids = encode_prompt(tok, [*system, *turns])
    return ids[-budget:]


def _cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn chat with an SFT model: the chat template, replies streamed as they come.

    One line of stdin is one user turn (``/reset`` forgets the conversation, ``/exit`` or EOF
    ends it), so the same command serves a terminal and a pipe.
    """
    from llm_core.checkpoint import load_weights
    from llm_core.generate import stream
    from llm_core.sft import ChatSpecials
    from llm_core.tokenizer import load_tokenizer

    weights = Path(args.weights)
    try:
        tok = load_tokenizer(_resolve_tokenizer(weights, args.tokenizer))
        model = load_weights(weights).eval()
        specials = ChatSpecials.from_tokenizer(tok)
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium chat: {exc}", file=sys.stderr)
        return 2
    context = model.config.context_length
    budget = max(context - args.max_new_tokens, context // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_history(tok, history, budget)
        sys.stdout.write("assistant> ")  # also when piped: one marked reply per turn
        reply = _stream_text(
            tok,
            stream(
                model,
                ids,
                args.max_new_tokens,
                stop_ids=(specials.end, specials.eot),
                **_sampling(args),
            ),
        )
        history.append({"role": "assistant", "content": reply})
    return 0


def _stream_text(tok: Tokenizer, tokens: Iterable[int]) -> str:
    """Write decoded text as tokens arrive; returns the whole reply (stripped)."""
    emitted: list[int] = []
    shown = ""
    for token in tokens:
        # Decode the whole tail each time: byte-level tokens may split a UTF-8 character.
        emitted.append(token)
        text = tok.decode(emitted, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    sys.stdout.flush()
    return tok.decode(emitted, skip_special_tokens=True).strip()


def _add_chat(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = subparsers.add_parser("chat", help="multi-turn chat with an SFT model (streamed)")
    chat.add_argument("--weights", required=True, help="folder with model.safetensors, config")
    chat.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside weights)")
    chat.add_argument("--system", default=None, help="system message for the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=200)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-k", type=int, default=50)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--repetition-penalty", type=float, default=1.1)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=_cmd_chat)


def _cmd_export(args: argparse.Namespace) -> int:
    """Write a Hugging Face model folder (config, safetensors, tokenizer, chat template, card)."""
    import os

    from llm_core.interop import export_hf
    from pipeline.model_card import STAGE_NAMES, card_info, stage_of

    weights = Path(args.weights)
    from pipeline.artefacts import data_root

    stage = {name: key for key, name in STAGE_NAMES.items()}
    try:
        tokenizer = _resolve_tokenizer(weights, args.tokenizer)
        card = card_info(
            data_root(),
            stage[args.stage] if args.stage else stage_of(weights.resolve()),
            profile_name=os.environ.get("SCRIPTORIUM_PROFILE"),
            base_model=args.base_model,
            licence=args.license,
        )
        out = export_hf(weights, tokenizer, args.out, card=card)
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {weights} to {out}")
    return 0


def _add_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    exp = subparsers.add_parser("export", help="write a Hugging Face model folder")
    exp.add_argument("--weights", required=True, help="folder with model.safetensors + config.json")
    exp.add_argument("--out", required=True, help="output folder (replaced atomically)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside weights)")
    exp.add_argument(
        "--stage",
        choices=["pretrain", "sft", "rlhf"],
        default=None,
        help="stage that produced the weights, for the model card (default: from the folder name)",
    )
    exp.add_argument("--base-model", default=None, help="Hub id this model was fine-tuned from")
    exp.add_argument("--license", default=None, help="Hub licence id for the card's metadata")
    exp.set_defaults(func=_cmd_export)


def _cmd_import(args: argparse.Namespace) -> int:
    """A Hugging Face Llama or GPT-2 folder (safetensors only) -> llm_core weights.

    A ``tokenizer.json`` in the folder comes along, given the chat tokens it lacks (the model's
    embedding grows to match), so ``scriptorium chat`` and SFT can use the result directly.
    """
    from safetensors import SafetensorError

    from pipeline.hub_import_cli import hub_import_cli
    from pipeline.sources.hub_models import convert_hf_folder

    if args.hub:  # org/name[@rev] through huggingface_hub (pipeline.sources.hub_models)
        return hub_import_cli(args)
    src, out = Path(args.hf), Path(args.out)
    try:  # every refusal is one line naming the file, exit status 2, no traceback
        model = convert_hf_folder(src, out)
    except (OSError, ValueError, SafetensorError) as exc:
        print(f"scriptorium: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    cfg = model.config
    print(f"imported {src} ({cfg.arch}, {model.num_params() / 1e6:.2f}M parameters) to {out}")
    return 0


def _add_import(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = subparsers.add_parser("import", help="convert a Hugging Face Llama/GPT-2 folder")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="folder with config.json + *.safetensors")
    src.add_argument("--hub", help="Hub model org/name[@revision] ($HF_ENDPOINT, $HF_TOKEN)")
    imp.add_argument(
        "--cache-dir", default=None, help="huggingface_hub cache (default: data/hf_cache)"
    )
    imp.add_argument("--out", required=True, help="llm_core weights folder to write")
    imp.set_defaults(func=_cmd_import)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; add a subcommand with one ``_add_*`` call here."""
    parser = argparse.ArgumentParser(
        prog="scriptorium", description="Scriptorium: public-domain books to a chat model."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_mirror(subparsers)
    _add_generate(subparsers)
    _add_chat(subparsers)
    _add_export(subparsers)
    _add_import(subparsers)
    _add_train(subparsers)
    run_view.add_parser(subparsers)
    serve_cli.add_serve(subparsers)
    publish.add_push(subparsers)
    classify_cli.add_classify(subparsers)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    """Run one training stage without Dagster, on the artefacts under ``$SCRIPTORIUM_DATA``."""
    import json
    import os

    from llm_core.config import load_profile
    from llm_core.stages import stage_module
    from llm_core.stages.base import Markdown, Tracking, execute, json_safe
    from pipeline.artefacts import Artefacts, data_root

    root = data_root()
    stage = stage_module(args.stage)
    try:
        profile = load_profile(args.profile)
        init = Path(args.init_weights) if args.init_weights else None
        config = stage.Config.from_profile(
            profile,
            Artefacts(root).stage_inputs(args.stage, init_weights=init),
            out_dir=Path(args.out or Path("out") / args.stage),
            steps=args.steps,
            device=args.device,
            resume=args.resume,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium train {args.stage}: {exc}", file=sys.stderr)
        return 2
    tracking = None
    if not args.no_mlflow:
        tracking = Tracking(
            uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}",
            run_name=f"{args.stage}-{config.profile}-cli",
            tags={
                "scriptorium.stage": args.stage,
                "scriptorium.profile": config.profile,
                "scriptorium.launcher": "scriptorium train",
            },  # fmt: skip
            registered_model=args.register_model,
        )
    result, tracked = execute(stage, config, tracking, log_line=print)
    shown = {k: v for k, v in result.headline().items() if not isinstance(v, Markdown)}
    shown["mlflow_run_id"] = tracked.run_id if tracked else None
    print(json.dumps(json_safe({"stage": args.stage, "out": str(config.out_dir), **shown})))
    return 0


def _add_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from llm_core.stages import STAGES

    train = subparsers.add_parser(
        "train", help="run one training stage (no Dagster) on the artefacts of $SCRIPTORIUM_DATA"
    )
    train.add_argument("stage", choices=STAGES, metavar="STAGE", help=" | ".join(STAGES))
    train.add_argument("--profile", default=None, help="profile name or YAML (default: env)")
    train.add_argument("--out", default=None, help="output folder (default: out/STAGE)")
    train.add_argument("--steps", type=int, default=0, help="override the profile's steps")
    train.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    train.add_argument("--init-weights", default=None, help="sft: start from this folder")
    train.add_argument("--register-model", default=None, help="register the weights in MLflow")
    train.add_argument("--no-mlflow", action="store_true", help="do not track the run")
    train.set_defaults(func=_cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
