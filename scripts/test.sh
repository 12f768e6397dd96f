#!/usr/bin/env bash
# The README's test command: on a fresh Debian (or Debian-based) machine, install what the suite
# runs for real, then lint, type-check and run every test. `.ci/run` calls exactly this.
#   bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real, each installed only when missing:
# - prometheus: promtool checks monitoring/ (tests/test_deploy.py) and a real server scrapes the
#   service (tests/test_monitoring_e2e.py).
# - chromium: tests/test_console.py drives the web console in it through Playwright.
# - redis-server: the scale-out tests run the shared queue, records and events on it.
# - libreoffice-writer-nogui, libreoffice-math-nogui: tests/test_formats_docx.py opens the DOCX export
#   in LibreOffice (headless), equations included, to prove Word-compatible files.
# - python3-venv: Debian ships the venv module apart from python3.
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v soffice >/dev/null || missing+=(libreoffice-writer-nogui)
dpkg -s libreoffice-math-nogui >/dev/null 2>&1 || dpkg -s libreoffice-math >/dev/null 2>&1 \
  || missing+=(libreoffice-math-nogui)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root=sudo
  $as_root apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "scripts/test.sh needs Python 3.11 or newer (Debian 12 and later ship it)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -r requirements-dev.txt

ruff check .
ruff format --check .
mypy app dsocr_client
python -m pytest -q "$@"
