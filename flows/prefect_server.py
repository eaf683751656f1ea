"""The Prefect API the `fiqa` flows report to, and a start of Prefect's temporary server that a slow
machine cannot break.

Without `PREFECT_API_URL`, Prefect starts a temporary local server the first time a flow runs and gives it
`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` (default 20 s) to answer. A first run on a fresh
machine creates and migrates a new SQLite database and imports the server stack from a cold disk: on a
2-core machine that has just installed the environment, or a busy one, that took longer than 20 s and a
newcomer's first `./scripts/demo` died with "Timed out while attempting to connect to ephemeral Prefect
API server" (and a 40-line traceback).

So `fiqa` starts that server itself, before any flow, and waits for it explicitly (`ensure_prefect_api`):

- with a timeout of its own, `STARTUP_TIMEOUT_S`, far above what a fresh start takes on a 2-core machine
  (benchmarks/bench_first_run.py: 8-11 s idle, up to 31 s beside two CPU-bound processes, 52 s beside four);
  it costs nothing when the server is healthy, because the wait ends when it answers.
  A timeout the user set (environment, Prefect profile, prefect.toml) wins, and so does `PREFECT_API_URL`
  (then nothing is started);
- watching the server's process, so that a server that dies (an unwritable PREFECT_HOME, a broken
  database) fails the command at once instead of after the whole timeout;
- turning every failure into one line (`PrefectServerError`) that names the setting to raise and how to
  point `PREFECT_API_URL` at a running server; the CLI prints it with exit status 2.

The server is Prefect's own `SubprocessASGIServer`, one per process: Prefect's client finds it running
and uses it (tests/test_first_run.py checks this, so a Prefect upgrade that changes it is caught).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fiqa_curator.schemas.errors import UserError

STARTUP_TIMEOUT_S = 300  # ~6x the slowest fresh start measured on a 2-core machine (52 s, docs/benchmarks.md)
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_PORT_IN_USE = 3  # the server's exit status when its port was taken; Prefect then retries on another port
_LOCK = threading.Lock()


class PrefectServerError(UserError):
    """No Prefect API to run flows against: the temporary server did not start, or none is allowed."""


def _remedy(timeout: int) -> str:
    return (
        f"raise {TIMEOUT_SETTING} (now {timeout}; for example `export {TIMEOUT_SETTING}={4 * timeout}`), "
        "or start a server (`prefect server start`) and point PREFECT_API_URL at it "
        "(`export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
    )


def startup_timeout() -> int:
    """Seconds the temporary server may take to answer: the user's setting when they made one, else ours."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:  # set in the environment, a profile or a toml
        return int(ephemeral.startup_timeout_seconds)
    return STARTUP_TIMEOUT_S


def ensure_prefect_api() -> str:
    """The URL of the Prefect API that flows of this process will use. When none is configured, starts
    Prefect's temporary server (once per process) and waits until it answers. Raises PrefectServerError."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return str(settings.api.url)  # the user's server (or the test harness's): nothing to start
    if not settings.server.ephemeral.enabled:
        raise PrefectServerError(
            "no Prefect API: PREFECT_API_URL is not set and the temporary server is disabled "
            "(PREFECT_SERVER_EPHEMERAL_ENABLED); point PREFECT_API_URL at a running server"
        )
    return _start_temporary_server(startup_timeout())


def start_prefect_api_in_background() -> Future[str]:
    """`ensure_prefect_api` on a helper thread, so that the server's start overlaps other work. Wait for the
    future before anything talks to Prefect: Prefect marks the server running before it answers, so a
    client made meanwhile would find it and fail to connect."""
    future: Future[str] = Future()
    context = contextvars.copy_context()  # Prefect's settings live in context variables

    def run() -> None:
        try:
            future.set_result(context.run(ensure_prefect_api))
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name="fiqa-prefect-server", daemon=True).start()
    return future


def _abandon(server: Any, outcome: Future[None]) -> None:
    """Stop a server that failed to start, and let Prefect's wait loop on the helper thread notice (it ends
    once the process is gone) before stopping whatever it may have started meanwhile."""
    server.stop()
    with contextlib.suppress(Exception):
        outcome.result(timeout=10)
    if server.server_process is not None:
        server.stop()


def _start_temporary_server(timeout: int) -> str:
    from prefect.server.api.server import SubprocessASGIServer

    with _LOCK:  # a second caller waits here, then finds the server running
        server = SubprocessASGIServer()  # the instance Prefect's own client will find (one per process)
        if server.running:
            return server.api_url
        outcome: Future[None] = Future()
        context = contextvars.copy_context()

        def start() -> None:
            try:
                # Prefect's own limit only as a backstop: the watch below ends the wait at `timeout`
                context.run(server.start, timeout=timeout + 60)
                outcome.set_result(None)
            except BaseException as error:
                outcome.set_exception(error)

        # Prefect's wait loop does not notice a server process that died (it polls until its timeout):
        # it runs on a helper thread while this one watches the process and the clock.
        threading.Thread(target=start, name="fiqa-prefect-start", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                outcome.result(timeout=0.25)
                return server.api_url
            except FutureTimeout:
                pass
            except Exception as error:
                _abandon(server, outcome)
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise PrefectServerError(
                    f"Prefect's temporary server did not start ({reason[:200]}): {_remedy(timeout)}"
                ) from None
            process = server.server_process
            code = process.poll() if process is not None else None
            if code is not None and code != _PORT_IN_USE:
                _abandon(server, outcome)
                raise PrefectServerError(
                    f"Prefect's temporary server exited with status {code} while starting "
                    f"(its output is above; its database is under PREFECT_HOME): "
                    f"{_remedy(timeout)}"
                )
            if time.monotonic() > deadline:
                _abandon(server, outcome)
                raise PrefectServerError(
                    f"Prefect's temporary server did not answer within {timeout} s: {_remedy(timeout)}"
                )
