# shellcheck shell=bash
# apt_install CHECK_PATH PACKAGE...: install Debian packages with apt-get when CHECK_PATH is missing.
# Root only; anyone else gets a warning with the command to run (the caller decides whether that is fatal).
# Sourced by scripts/setup.sh (make setup) and deploy/smoke.sh (make smoke).
declare -F say >/dev/null || say() { printf '%s\n' "$*"; }

apt_install() {
  local check=$1; shift
  if [ -e "$check" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
  else
    say "WARNING: $check is missing and this user cannot apt-get; run: sudo apt-get install -y $*"
  fi
}
