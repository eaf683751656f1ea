"""The start-ups of a first run that have a time limit, on an idle machine and with CPU-bound processes
beside them, measured side by side in one run:

- Prefect's temporary server on a new, empty PREFECT_HOME (the database is created and migrated): the
  figure behind `flows.prefect_server.STARTUP_TIMEOUT_S`, and why Prefect's own 20 s default failed a
  newcomer's first `./scripts/demo`;
- a private local Ray (`flows.cluster.init_ray`), which Ray gives 30 s (hard-coded in ray._private.node).

    .venv/bin/python benchmarks/bench_first_run.py --repeats 3 --busy 0,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PROBE = """
import json, time
started = time.perf_counter()
from prefect.server.api.server import SubprocessASGIServer
imported = time.perf_counter()
server = SubprocessASGIServer()
try:
    server.start(timeout=900)
    print(json.dumps({"import_s": imported - started, "answer_s": time.perf_counter() - imported}))
finally:
    server.stop()
"""
RAY_PROBE = """
import json, os, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
started = time.perf_counter()
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
print(json.dumps({"ray_s": time.perf_counter() - started}))
ray.shutdown()
"""
BUSY = "while True: pass"


def _probe(code: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_start(busy: int) -> dict[str, float]:
    """One fresh-home start of the temporary server, then of a local Ray, each in a new process, with
    `busy` CPU burners running."""
    burners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as home:
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
            env.update(
                HOME=home,
                PREFECT_HOME=os.path.join(home, ".prefect"),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="WARNING",
            )
            return {**_probe(PROBE, env), **_probe(RAY_PROBE, env)}
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", default="0,2,4", help="CPU-bound processes beside the start, per condition")
    args = parser.parse_args()
    conditions = [int(v) for v in args.busy.split(",")]
    results: dict[int, list[dict[str, float]]] = {busy: [] for busy in conditions}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every condition alike
        for busy in conditions:
            results[busy].append(first_start(busy))
    print(
        f"first start on a new PREFECT_HOME; {os.cpu_count()} cores; median and max of {args.repeats}; "
        "limits: Prefect's default 20 s (fiqa: 300 s), Ray's 30 s"
    )
    print(
        f"{'busy processes':>15} {'prefect import s':>17} {'server answers s':>17} {'max':>6} {'x idle':>7} "
        f"{'ray.init s':>11} {'max':>6} {'x idle':>7}"
    )
    idle = {key: statistics.median(r[key] for r in results[conditions[0]]) for key in ("answer_s", "ray_s")}
    for busy in conditions:
        answer, ray_start = [r["answer_s"] for r in results[busy]], [r["ray_s"] for r in results[busy]]
        print(
            f"{busy:>15} {statistics.median(r['import_s'] for r in results[busy]):>17.1f} "
            f"{statistics.median(answer):>17.1f} {max(answer):>6.1f} "
            f"{statistics.median(answer) / idle['answer_s']:>7.2f} "
            f"{statistics.median(ray_start):>11.1f} {max(ray_start):>6.1f} "
            f"{statistics.median(ray_start) / idle['ray_s']:>7.2f}"
        )


if __name__ == "__main__":
    main()
