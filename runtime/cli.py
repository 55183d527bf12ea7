"""The `nectar` command. Subcommands import their heavy libraries (torch, onnx) only when run.

Bad input ends in one line on stderr (`nectar: ...`) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .errors import NectarError
from .generate import GenerationConfig
from .sampling import SamplingConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (the rest of the CLI's bad-input contract), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (thread counts)."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def check_question(text: str, flag: str) -> None:
    """Refuse an empty question and non-UTF-8 text before any model or bundle is loaded."""
    from .tokenizer import check_utf8

    if not text.strip():
        raise NectarError(f"{flag}: the question is empty; ask something")
    check_utf8(text)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d, s = GenerationConfig(), SamplingConfig()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=s.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=s.top_k, help="keep the k most likely tokens, 0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=s.top_p, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, default=s.seed, help="RNG seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is generated (repeatable)")


def generation_config(a: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=a.max_new_tokens,
        sampling=SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed),
        stop_strings=tuple(a.stop),
    )


def print_stream(pieces, session=None, in_chat: bool = False) -> None:
    """Write text pieces to stdout as they arrive, then a newline; then, on stderr, whether the
    answer was empty (the model ended its turn at once: say so rather than print a blank line) or
    cut by a full local window (a ChatSession's `window_full`)."""
    shown = False
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        shown = shown or bool(piece.strip())
    sys.stdout.write("\n")
    if not shown:
        sys.stdout.flush()
        print("nectar: the model ended its answer without any text; rephrase the question", file=sys.stderr)
    if session is not None and session.turns_dropped:
        sys.stdout.flush()
        print(f"nectar: the {session.turns_dropped} oldest turns no longer fitted the local window and were dropped "
              "(the document stays); /reset starts over", file=sys.stderr)
    if session is not None and session.window_full:
        sys.stdout.flush()
        print(f"nectar: the answer stopped where the window ends ({session.window_full} local tokens); ask a shorter "
              f"question{' or /reset the chat' if in_chat else ''} (a bundle exported with a larger --max-local-len "
              "holds more)", file=sys.stderr)


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub import pull

    for name in a.names:
        print(pull(name))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .hub import list_models

    for entry, path in list_models():
        print(f"{entry.name:24s} {'pulled: ' + str(path) if path else 'not pulled (nectar pull ' + entry.name + ')'}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .chat_session import open_torch_session

    cfg = generation_config(a)  # validate options before loading anything
    if a.artifact and a.system is not None:
        raise NectarError("--system cannot be used with --artifact: the turn that holds the document was fixed "
                          "when the artifact was fitted; put instructions in the question instead")
    session = open_torch_session(model=a.model, artifact=a.artifact, device=a.device, dtype=a.dtype)
    print_stream(session.stream(a.prompt, cfg, chat=a.chat or bool(a.artifact), system=a.system), session)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .bundle_session import open_bundle_session

    cfg = generation_config(a)
    check_question(a.chat, "--chat")
    session = open_bundle_session(a.bundle, threads=a.threads, provider=a.provider)
    print_stream(session.stream(a.chat, cfg), session)
    return 0


DEVICE_HELP = "auto (the default): cuda when torch sees a GPU, else cpu; or cpu, cuda, cuda:N"
CHAT_HELP = ("/reset clears the conversation, /exit (or Ctrl-D) quits, /help shows this; any other /word opening "
             "a line is taken for a mistyped command (a path such as /etc/fstab is asked as written)")
CHAT_COMMAND = re.compile(r"/[A-Za-z?]+")  # "/rest", "/Reset", "/help"; not a path such as /etc/fstab


def cmd_chat(a: argparse.Namespace) -> int:
    from .bundle_session import open_bundle_session

    cfg = generation_config(a)
    session = open_bundle_session(a.bundle, threads=a.threads, provider=a.provider)
    print(f"nectar chat: ask about the document; {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if CHAT_COMMAND.fullmatch(cmd.split()[0]):  # a mistyped command must not become a question
            print(f"nectar: unknown command {cmd.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from the terminal arrive as lone surrogates
            print("nectar: that line is not valid UTF-8; set the terminal to UTF-8 and ask again", file=sys.stderr)
            continue
        try:
            print_stream(session.stream(line, cfg), session, in_chat=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat (the turn is not kept)
            print("\n(answer interrupted; Ctrl-D or /exit quits)", file=sys.stderr)
        except NectarError as e:  # e.g. a question too long for the bundle's window: say so, keep going
            print(f"\nnectar: {e}", file=sys.stderr)


def add_bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory written by `nectar export`")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--provider", default=None, choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (default: the best this onnxruntime has)")
    add_sampling_args(p)


_EXPORT_ONLY = {"torch", "transformers", "onnx", "safetensors", "accelerate", "matplotlib", "triton", "tensorrt"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nectar", description="Nectar: fitted document attention, export and runtime.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pull", help="download models by name into the cache ($NECTAR_HOME or ~/.cache/nectar)")
    p.add_argument("names", nargs="+", metavar="NAME", help="smollm2-135m-instruct, gemma3-270m")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list the known model names and whether they are pulled")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate text, streaming to stdout (torch; with --artifact on CUDA the fused CUDA-graph step)")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--model", default=None, help="model name, .gguf file or HF directory (default smollm2-135m-instruct; "
                   "with --artifact: the artifact's own model, or a copy of it with the same weights)")
    p.add_argument("--artifact", default=None, help="a Nectar artifact directory: its document is answered from its heads")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(default %(default)s)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="answer one question from a bundle (no torch needed)")
    add_bundle_args(p)
    p.add_argument("--chat", required=True, metavar="QUESTION", help="the question (a user turn after the document)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat over a bundle's document, streaming (/reset, /exit, /help)")
    add_bundle_args(p)
    p.set_defaults(func=cmd_chat)

    # fit / ask / eval / export: the exporter's commands (their handlers import torch when run)
    from nectar_export.cli import add_export_commands

    add_export_commands(sub)
    from nectar_profiling.cli import add_profile_command  # nectar profile (torch/ort runners imported when run)

    add_profile_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NectarError as e:
        print(f"nectar: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in _EXPORT_ONLY:
            print(f"nectar {args.command}: needs {e.name}, which this install lacks; "
                  "install the exporter extras: pip install 'nectar-attention[export]'", file=sys.stderr)
            return 2
        return _internal_error(e)
    except KeyboardInterrupt:
        print("nectar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        return _internal_error(e)


def _internal_error(e: Exception) -> int:
    """A bug, not bad input: still one line unless asked for the traceback."""
    if os.environ.get("NECTAR_DEBUG"):
        raise e
    print(f"nectar: internal error: {type(e).__name__}: {e} (set NECTAR_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
