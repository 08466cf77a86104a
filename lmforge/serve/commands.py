"""`lmforge serve MODEL`: the OpenAI-compatible server (lmforge/serve/app.py) on 127.0.0.1 unless told otherwise.
Heavy imports stay inside the function, so `lmforge --help` does not load torch or FastAPI."""

from __future__ import annotations

import argparse

from lmforge.hardware import QUANT_SCHEMES
from lmforge.registry import add_model_argument, command, model_from_args

from .policies import POLICIES


def _serve_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, alias="--ckpt")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL's name)")
    p.add_argument("--kv", choices=["paged", "int8"], default="paged", help="KV cache: paged fp, or paged int8")
    p.add_argument("--quantize", choices=list(QUANT_SCHEMES), help="weights: int8, w8a8, int4 or bf16")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-waiting", type=int, default=128, help="requests queued beyond it get 429")
    p.add_argument("--kv-memory", type=float, default=1.0, metavar="GIB", help="KV cache memory (GiB)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; per replica)")
    r = p.add_argument_group("replicas: K processes behind one router on --host:--port")
    r.add_argument("--replicas", type=int, default=1, metavar="K", help="replica processes (default 1: no router)")
    r.add_argument("--policy", choices=POLICIES, default="cache_aware", help="how the router picks a replica")
    g = p.add_argument_group("the A/B rating page at /rate (the records `lmforge prefs collect` writes)")
    g.add_argument("--rate-prompts", metavar="SPEC", help="task:SPEC or a JSONL of prompts: turns /rate on")
    g.add_argument("--rate-out", default="prefs/rate.jsonl", help="preference records (appended; resumes)")
    g.add_argument("--rate-n", type=int, default=50, help="prompts to rate")
    g.add_argument("--rate-against", metavar="MODEL", help="sample B from this model (A: the served one)")
    g.add_argument(
        "--rate-temperatures",
        default=None,
        metavar="A,B",
        help="the two samples' temperatures (default 0.7,1.0; 0.7,0.7 with --rate-against)",
    )


@command("serve", help="serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming)",
         arguments=_serve_args)  # fmt: skip
def serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmforge.config import UserError

    for name, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-waiting", args.max_waiting, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"{name} must be ≥ {low}, got {value}")
    if args.kv_memory <= 0:
        raise UserError(f"--kv-memory must be > 0 GiB, got {args.kv_memory}")
    if args.rate_temperatures is None:
        args.rate_temperatures = "0.7,0.7" if args.rate_against else "0.7,1.0"
    if args.rate_against and not args.rate_prompts:
        raise UserError("--rate-against compares two models on the rating page: give --rate-prompts SPEC too")
    try:
        temperatures = [float(t) for t in args.rate_temperatures.split(",")]
    except ValueError:
        temperatures = []
    if len(temperatures) != 2 or min(temperatures) < 0:
        raise UserError(f"--rate-temperatures must be two numbers ≥ 0 like 0.7,1.0, got {args.rate_temperatures}")
    _check_port_free(args.host, args.port)  # before the model loads: a second copy on a taken port is one line
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be ≥ 1, got {args.threads}")
    if args.replicas < 1:
        raise UserError(f"--replicas must be ≥ 1, got {args.replicas}")
    if args.replicas > 1:
        return _serve_replicas(args)
    import torch
    import uvicorn

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from .app import build_app
    from .server import DrainingServer

    source = model_from_args(args)
    loop, tok = _engine_loop(source, args, verbose=True)
    name = args.served_model_name or Path(source).stem
    rate = None
    loops = [loop]
    if args.rate_prompts:
        from .rate import Against, RateConfig, RateSession

        against = None
        if args.rate_against:  # a second engine on its own thread, with the same options; it shares the cores
            other, other_tok = _engine_loop(args.rate_against, args)
            loops.append(other)
            against = Against(other, other_tok)
        ta, tb = temperatures
        rate = RateSession(loop, tok, RateConfig(args.rate_prompts, Path(args.rate_out), args.rate_n, ta, tb,
                                                 policy=source, against=args.rate_against), against)  # fmt: skip
    app = build_app(loop, tok, model_name=name, api_key=args.api_key, rate=rate)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C drains and stops)", flush=True)
    if rate is not None:
        print(f"rating page: http://{args.host}:{args.port}/rate → {args.rate_out}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    try:
        DrainingServer(config, loop).run()
    finally:  # drained (or a second Ctrl-C): whatever still runs is cancelled, the engine threads stop
        for each in loops:
            each.close()


def _engine_loop(source: str, args: argparse.Namespace, *, verbose: bool = False):
    """(an EngineLoop over MODEL with the command's --quantize, --kv, --max-batch, --kv-memory, --max-waiting, its
    tokenizer)."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.engine_loop import EngineLoop
    from lmforge.infer.fastpath import optimize_for_decode
    from lmforge.infer.loading import load_for_inference
    from lmforge.infer.quantize import quantize_model

    model, tok = load_for_inference(source)
    if args.quantize:
        quantize_model(model, args.quantize)
    optimize_for_decode(model)
    engine = Engine(model, tokenizer=tok, kv_dtype="int8" if args.kv == "int8" else None, max_batch=args.max_batch,
                    kv_memory_gib=args.kv_memory, verbose=verbose)  # fmt: skip
    return EngineLoop(engine, max_waiting=args.max_waiting), tok


def _serve_replicas(args: argparse.Namespace) -> None:
    from lmforge.config import UserError

    from .replicas import default_threads, run_router, start_replicas, stop_replicas

    if args.rate_prompts:
        raise UserError("the rating page runs on one server: drop --replicas, or --rate-prompts")
    model_from_args(args)
    if args.served_model_name is None:
        from pathlib import Path

        args.served_model_name = Path(args.model or args.model_alias).stem  # one name on every replica
    procs, urls = start_replicas(args, args.replicas, args.threads or default_threads(args.replicas))
    try:
        run_router(urls, args.policy, args.host, args.port)
    finally:
        stop_replicas(procs)


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", required=True, metavar="URL",
                   help="a replica's base URL (http://HOST:PORT); repeat for each")  # fmt: skip
    p.add_argument("--policy", choices=POLICIES, default="cache_aware", help="how a replica is picked")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--health-interval", type=float, default=1.0, metavar="S", help="seconds between health checks")
    p.add_argument("--session-header", default="x-session-id", help="the header the session policy hashes")


@command("router", help="one OpenAI-compatible address in front of lmforge serve replicas, routed by a policy",
         arguments=_router_args)  # fmt: skip
def router(args: argparse.Namespace) -> None:
    from lmforge.config import UserError

    from .replicas import run_router

    bad = [b for b in args.backend if not b.startswith(("http://", "https://"))]
    if bad:
        raise UserError(f"--backend takes a URL like http://127.0.0.1:8001, got {bad[0]!r}")
    if args.health_interval <= 0:
        raise UserError(f"--health-interval must be > 0 s, got {args.health_interval}")
    _check_port_free(args.host, args.port)
    run_router(args.backend, args.policy, args.host, args.port, health_interval=args.health_interval,
               session_header=args.session_header)  # fmt: skip


def _check_port_free(host: str, port: int) -> None:
    import socket

    from lmforge.config import UserError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a socket in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): give another --port (or --host)") from None
