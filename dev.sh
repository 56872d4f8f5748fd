#!/usr/bin/env bash
# One entry point that sets itself up: creates .venv (first run), installs the project under constraints.txt
# (again only when pyproject.toml or constraints.txt changed), then runs what you asked for. Safe to run twice.
#
#   ./dev.sh repro [dvc repro args]   run the whole pipeline with DVC (WARM=0: without the warm stage server)
#   ./dev.sh repro --jobs N [...]     the same, N stages at a time on this machine (Ray; python -m pipeline.distributed -h)
#   ./dev.sh repro --cluster ADDR     the same on a running Ray cluster, through a shared DVC remote (--remote URL)
#   ./dev.sh test [pytest args]       run the test suite
#   ./dev.sh dvc ARGS...              any dvc command inside the environment (exp run, metrics show, ...)
#   ./dev.sh python ARGS...           the environment's python
#   ./dev.sh preset NAME              apply presets/NAME.yaml to params.yaml (photos, study)
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac   # relative to this folder; absolute from here on, for PATH
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "dev.sh: needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"   # dvc runs `python -m pipeline.<stage>`: this environment's python

cmd="${1:-}"; shift || true
case "$cmd" in
  repro)  if printf '%s\n' "$@" | grep -qE '^(--jobs|-j|--cluster)(=|$)|^-j[0-9]'; then
            python -m pipeline.distributed "$@"   # stages as Ray tasks; ends with a dvc repro that runs nothing
          elif [ "${WARM:-1}" = 0 ]; then
            dvc repro "$@"
          else  # each stage forked from one process that imported torch once (pipeline/runtime/warm.py)
            mkdir -p .dvc/tmp
            python -m pipeline.runtime.warm run --log .dvc/tmp/warm-server.log -- dvc repro "$@"
          fi  # then the report's first sections, less images; the whole of it is reports/report.html
          [ ! -f reports/report.md ] || sed '/^## Where the errors are/,$d' reports/report.md | grep -v '^!\[' ;;
  test)   python -m pytest "$@" ;;
  dvc)    dvc "$@" ;;
  python) python "$@" ;;
  preset) python -m pipeline.presets "$@" ;;
  *) echo "usage: ./dev.sh repro|test|dvc|python|preset [args]" >&2; exit 2 ;;
esac
