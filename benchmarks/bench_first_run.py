"""How long Prefect's temporary server takes to answer on a first run (a new, empty PREFECT_HOME: the
database is created and migrated), on an idle machine and with CPU-bound processes beside it, measured
side by side in one run. This is the figure behind `flows.prefect_server.STARTUP_TIMEOUT_S`, and why
Prefect's own 20 s default failed a newcomer's first `./scripts/demo`.

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
BUSY = "while True: pass"


def first_start(busy: int) -> dict[str, float]:
    """One fresh-home start of the temporary server in a new process, with `busy` CPU burners running."""
    burners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as home:
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
            env.update(HOME=home, PREFECT_HOME=os.path.join(home, ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       PREFECT_LOGGING_LEVEL="WARNING")
            out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", default="0,2,4", help="CPU-bound processes beside the start, per condition")
    args = parser.parse_args()
    conditions = [int(v) for v in args.busy.split(",")]
    results: dict[int, list[dict[str, float]]] = {busy: [] for busy in conditions}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every condition alike
        for busy in conditions:
            results[busy].append(first_start(busy))
    print(f"Prefect temporary server, first start on a new PREFECT_HOME; {os.cpu_count()} cores; "
          f"median (max) of {args.repeats}; Prefect's default limit is 20 s")
    print(f"{'busy processes':>15} {'import s':>9} {'answer s':>9} {'max answer s':>13}")
    idle = statistics.median(r["answer_s"] for r in results[conditions[0]])
    for busy in conditions:
        answer = [r["answer_s"] for r in results[busy]]
        print(f"{busy:>15} {statistics.median(r['import_s'] for r in results[busy]):>9.1f} "
              f"{statistics.median(answer):>9.1f} {max(answer):>13.1f}   x{statistics.median(answer) / idle:.2f}")


if __name__ == "__main__":
    main()
