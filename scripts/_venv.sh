# Sourced by the quick-start scripts: makes sure .venv exists at the repository root and holds the project
# as currently declared. Reinstalls only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.fiqa-install-stamp"
PYTHON_BIN="${FIQA_PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

want="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ ! -x "$VENV/bin/python" ] || [ "$want" != "$have" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[fiqa] creating $VENV with $("$PYTHON_BIN" --version 2>&1) (first run: a few minutes, torch is large)" >&2
        "$PYTHON_BIN" -m venv "$VENV"
    else
        echo "[fiqa] pyproject.toml changed: updating $VENV" >&2
    fi
    # Plain pip on purpose: it honours this machine's local wheel mirrors; the constraints keep torch pinned.
    log="$VENV/install.log"
    if ! "$VENV/bin/python" -m pip install -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT[dev]" >"$log" 2>&1; then
        echo "[fiqa] installation failed; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    echo "$want" > "$STAMP"
    echo "[fiqa] environment ready ($log)" >&2
fi
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"
