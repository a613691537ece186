#!/usr/bin/env bash
# Installs what the deployment and browser tests need, only where it is missing, with bounded
# timeouts. Called by the session fixtures in tests/e2e/conftest.py; safe to run by hand.
#
#   tests/e2e/setup_system_deps.sh postgres chromium compose playwright
#
#   postgres    PostgreSQL server binaries (initdb, pg_ctl)      Debian: postgresql
#   chromium    a headless-capable Chromium                      Debian: chromium
#   compose     `docker compose` or `docker-compose` (config only, no engine needed)
#                                                                Debian: docker-compose
#   redis       the Celery executor test's broker (redis-server) Debian: redis-server
#   playwright  the Playwright Python package, if the venv lacks it (pip; never its browsers)
#
# Exit status 0 when every requested dependency is present afterwards; otherwise 1, with one line
# per missing dependency on stderr (the fixtures turn that into a skip with the reason, which
# tests/conftest.py turns into a failure under CI=true). .ci/run calls it for the apt packages.
set -uo pipefail

PLAYWRIGHT_PIN=${PLAYWRIGHT_PIN:-playwright==1.65.2}
APT_TIMEOUT=${APT_TIMEOUT:-600}
# The project's interpreter (the fixtures pass theirs); never a system Python by accident.
VENV_PYTHON="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
PYTHON=${PYTHON:-$VENV_PYTHON}

have_postgres() { command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }
have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
have_redis() { command -v redis-server >/dev/null; }
have_playwright() { "$PYTHON" -c 'import playwright.sync_api' >/dev/null 2>&1; }

apt_packages=()
missing=()
for dep in "$@"; do
  case "$dep" in
    postgres) have_postgres || apt_packages+=(postgresql) ;;
    chromium) have_chromium || apt_packages+=(chromium fonts-liberation) ;;
    compose) have_compose || apt_packages+=(docker-compose) ;;
    redis) have_redis || apt_packages+=(redis-server) ;;
    playwright)
      have_playwright || timeout 300 "$PYTHON" -m pip install -q "$PLAYWRIGHT_PIN" >&2 \
        || echo "setup_system_deps: pip install $PLAYWRIGHT_PIN failed" >&2 ;;
    *) echo "setup_system_deps: unknown dependency '$dep'" >&2; exit 2 ;;
  esac
done

if ((${#apt_packages[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup_system_deps: apt-get install ${apt_packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # One `apt-get update` an hour is enough when several fixtures call this in turn.
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null) ]]; then
      timeout "$APT_TIMEOUT" apt-get update -qq >&2 || echo "setup_system_deps: apt-get update failed" >&2
    fi
    timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >&2 \
      || echo "setup_system_deps: apt-get install failed" >&2
  else
    echo "setup_system_deps: not root or no apt-get; cannot install ${apt_packages[*]}" >&2
  fi
fi

for dep in "$@"; do
  case "$dep" in
    postgres) have_postgres || missing+=("postgres: no initdb (apt-get install postgresql)") ;;
    chromium) have_chromium || missing+=("chromium: not installed (apt-get install chromium)") ;;
    compose) have_compose || missing+=("compose: neither 'docker compose' nor docker-compose") ;;
    redis) have_redis || missing+=("redis: no redis-server (apt-get install redis-server)") ;;
    playwright) have_playwright || missing+=("playwright: pip install $PLAYWRIGHT_PIN") ;;
  esac
done
for line in "${missing[@]}"; do echo "missing $line" >&2; done
((${#missing[@]} == 0))
