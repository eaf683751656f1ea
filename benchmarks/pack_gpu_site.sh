#!/usr/bin/env bash
# Packs what `fiqa score` needs beyond a lent GPU machine's own Python into .devpkgs/site.tar.xz, so that
# benchmarks/gpu_check.py's end-to-end runs work there. That machine's image (see the device tool's
# KINDS.md) has Python 3.12 with torch, torchvision, timm, numpy, pyarrow, pandas, scipy, Pillow and fsspec,
# but no Ray, Prefect, DuckDB or pydantic, and no package registry; at most 64 MiB travel with the
# working tree. Ray, DuckDB and friends for Python 3.12 come to ~870 MB installed: this keeps what the
# pipeline imports, strips the native binaries' symbols and drops what the machine already has (numpy,
# pandas, pyarrow: compiled against each other there) and what the pipeline never loads (Ray's Java jars,
# RLlib, its dashboard's web client; Prefect's web UI). Result: ~50 MB.
#
#     benchmarks/pack_gpu_site.sh          # here: needs python3.12 (pyenv) and the package registry
#
# Then one `device run` (carry [".devpkgs"]), whose command unpacks it and puts the sources on the path
# (the package maps flows/, workers/ ... to fiqa_curator.*; pip would refuse Python 3.12):
#
#     mkdir -p /tmp/site /tmp/pkg/fiqa_curator && tar -C /tmp/site -xJf .devpkgs/site.tar.xz &&
#     for d in flows workers schemas evaluation demo_kit; do ln -s $PWD/$d /tmp/pkg/fiqa_curator/$d; done &&
#     export PYTHONPATH=/tmp/site:/tmp/pkg HOME=$(mktemp -d) PREFECT_HOME=$(mktemp -d) \
#            PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled &&
#     python3 benchmarks/gpu_check.py --e2e-images 60000 --json $OUT/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYENV_VERSION=${PYENV_VERSION:-3.12.1} python3.12 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c constraints.txt "ray[data]" "prefect>=3.4,<4" "duckdb>=1.1" "pydantic>=2.7" rich
site="$work/venv/lib/python3.12/site-packages"
cd "$site"
# what the GPU machine has (compiled against each other there) or what the pipeline never loads
rm -rf pyarrow pyarrow-* pandas pandas-* numpy numpy-* numpy.libs pip pip-* \
    pygments pygments-* yaml _yaml pyyaml-* regex regex-* packaging packaging-* urllib3 urllib3-* \
    requests requests-* docker docker-* apprise apprise-* \
    ray/jars ray/rllib ray/llm ray/dashboard/client/build prefect/server/ui prefect/server/ui-v2
find . -name __pycache__ -type d -prune -exec rm -rf {} +
find . \( -name "*.so" -o -path "*/ray/core/src/ray/*" -type f -perm -u+x \) -exec strip --strip-unneeded {} + 2>/dev/null || true
cd - >/dev/null
mkdir -p .devpkgs
grep -qx "/.devpkgs/" .git/info/exclude 2>/dev/null || echo "/.devpkgs/" >>.git/info/exclude
tar -C "$site" -cf - . | xz -T0 -9 >.devpkgs/site.tar.xz
ls -la .devpkgs/site.tar.xz
