"""uvicorn's server with a draining stop: the first Ctrl-C (or SIGTERM) stops taking requests — new ones get 503 in
OpenAI's shape, from the same socket, so clients and load balancers see a clear answer rather than a refused
connection — lets those in flight finish, then exits; a second Ctrl-C stops at once (in-flight requests end).

    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=8000), loop)
    server.run()
"""

from __future__ import annotations

import sys
import threading

import uvicorn

from lmforge.infer.engine_loop import EngineLoop


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, loop: EngineLoop, *, drain_timeout: float | None = None):
        super().__init__(config)
        self.loop, self.drain_timeout = loop, drain_timeout
        self.draining = threading.Event()

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler, on the main thread
        if self.draining.is_set():  # the second signal: stop now
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.draining.set()
        self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown, as it does for its own stop
        stats = self.loop.stats()
        n = stats.running + stats.waiting
        print(f"draining: {n} request{'' if n == 1 else 's'} in flight finish{'es' if n == 1 else ''}, new ones get "
              "503 (Ctrl-C again stops now)", file=sys.stderr, flush=True)  # fmt: skip
        threading.Thread(target=self._drain_then_exit, name="lmforge-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.loop.drain(timeout=self.drain_timeout)
        except TimeoutError as e:
            print(f"stopping anyway: {e}", file=sys.stderr, flush=True)
        self.should_exit = True
