"""`lmforge serve MODEL --replicas K` and `lmforge router`: K replica processes of `lmforge serve` on free local
ports (`--threads` each), and the router (`router.py`) in front of them on the given address; one Ctrl-C stops all
(the replicas drain: what is in flight finishes).

    lmforge serve runs/sft --replicas 2 --threads 1 --policy cache_aware --port 8000
    lmforge router --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000 --policy least_loaded
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from lmforge.config import UserError

# the `lmforge serve` options a replica takes from the command that starts it
REPLICA_OPTIONS = ("kv", "quantize", "max_batch", "max_waiting", "kv_memory", "api_key", "served_model_name")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_command(args, port: int, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "lmforge", "serve", args.model or args.model_alias, "--port", str(port),
           "--threads", str(threads)]  # fmt: skip
    for name in REPLICA_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def start_replicas(args, count: int, threads: int, timeout: float = 600.0) -> tuple[list[subprocess.Popen], list[str]]:
    """Start `count` replicas and wait until each answers /health; a replica that exits first is one line."""
    import httpx

    procs, urls, logs = [], [], []
    try:
        for _ in range(count):
            port = free_port()
            log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a replica must never block on a full one
            procs.append(subprocess.Popen(replica_command(args, port, threads), stdout=subprocess.DEVNULL,
                                          stderr=log, text=True))  # fmt: skip
            logs.append(log)
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for proc, url, log in zip(procs, urls, logs):
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    lines = log.read().strip().splitlines()
                    why = lines[-1].removeprefix("lmforge: error: ") if lines else "no message"
                    raise UserError(f"replica {url} exited before serving: {why}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise UserError(f"replica {url} did not answer /health within {timeout:.0f} s")
                time.sleep(0.3)
        print(f"{count} replicas ({threads} thread{'s' if threads != 1 else ''} each): {', '.join(urls)}", flush=True)
        return procs, urls
    except BaseException:
        stop_replicas(procs)
        raise


def stop_replicas(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGINT each (it drains), then wait; whatever is still there after `grace` seconds is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def default_threads(count: int) -> int:
    return max(1, (os.cpu_count() or 1) // count)


def run_router(backends: list[str], policy_name: str, host: str, port: int, *, health_interval: float = 1.0,
               session_header: str = "x-session-id") -> None:  # fmt: skip
    import uvicorn

    from .policies import make_policy
    from .router import Router, build_router_app

    try:
        policy = make_policy(policy_name, [b.rstrip("/") for b in backends])
    except ValueError as e:
        raise UserError(str(e)) from None
    router = Router(backends, policy, health_interval=health_interval, session_header=session_header)
    print(f"routing ({policy_name}) at http://{host}:{port}/v1 over {len(backends)} replicas (Ctrl-C stops)",
          flush=True)  # fmt: skip
    uvicorn.run(build_router_app(router), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
