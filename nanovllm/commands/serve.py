"""`nanovllm serve [MODEL]`: the OpenAI-compatible HTTP server over one model (needs the `serve` extra)."""
import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanovllm.commands.arguments import add_engine_arguments, int_in
    p.add_argument("model", nargs="?", help="a Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-"
                                            "Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="TCP port to listen on (0: any free one)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: NANOVLLM_API_KEY, else no key)")
    p.add_argument("--served-model-name", help="the name clients give as `model` (default: the model path as "
                                               "given, or SmolLM2-135M-Instruct for the embedded model)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may finish before they are aborted")
    p.add_argument("--chat-template", help="the chat template for /v1/chat/completions and /tokenize: a file "
                                           "holding a Jinja template, or the template itself (default: the "
                                           "tokenizer's; a request's `chat_template` overrides either)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the HTTP server's log level")
    add_engine_arguments(p)


def check_serve_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeError(f"nanovllm serve needs {', '.join(missing)}: pip install 'nanovllm[serve]'")


def main(args: argparse.Namespace) -> int:
    check_serve_extra()
    from nanovllm.async_llm import AsyncLLM
    from nanovllm.commands.arguments import engine_options
    from nanovllm.core.logging import get_logger
    from nanovllm.entrypoints.openai.api_server import bind_socket, run_server
    from nanovllm.chat_template import load_chat_template
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None  # ValueError at once
    sock = bind_socket(args.host, args.port)  # before loading the model, which can take minutes
    with sock:
        llm = AsyncLLM(args.model, args.backend, **engine_options(args))
        if chat_template is not None:
            llm.tokenizer.chat_template = chat_template
        name = args.served_model_name or (args.model or os.path.basename(llm.config.model))
        port = sock.getsockname()[1]
        get_logger(__name__).info("serving %s as %r on http://%s:%d", llm.config.model, name, args.host, port)
        try:
            run_server(llm, name, args.host, port, args.api_key, args.shutdown_timeout, args.log_level, sock=sock)
        finally:
            llm.close()
    return 0
