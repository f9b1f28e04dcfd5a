# Sourced by scripts/test (or run with bash): makes sure Debian's `chromium` and
# `chromium-driver` are installed, for the browser end-to-end test (tests/it/browser.rs).
# Installs them when missing, with `apt-get update` once first (needs root, as on CI and
# the developers' machines). Tools that download their own browser builds cannot be used:
# only the package registries are reachable. CHROMIUM and CHROMEDRIVER override the paths;
# when both are set, nothing is installed.
install_browser() {
  local caller=${1:-install-browser}
  if [ -n "${CHROMIUM:-}" ] && [ -n "${CHROMEDRIVER:-}" ]; then
    return 0
  fi
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$caller: chromium and chromedriver are missing, and there is no apt-get to install them" >&2
    echo "  (set CHROMIUM and CHROMEDRIVER to a Chromium and its matching chromedriver)." >&2
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
  echo "$caller: installing chromium and chromium-driver (Debian packages) for the browser test" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  install_browser "$0"
fi
