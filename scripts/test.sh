#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite, GUI tests included, headless under Xvfb.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System libraries for a headless napari (Xvfb + Mesa OpenGL + the Qt xcb platform plugin).
APT_PACKAGES=(xvfb libgl1 libglx-mesa0 libgl1-mesa-dri libegl1 libopengl0 libdbus-1-3 libxkbcommon-x11-0
  libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 x11-utils)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
elif ! command -v xvfb-run >/dev/null 2>&1; then
  missing=("${APT_PACKAGES[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "error: the GUI tests need these system packages: ${missing[*]}" >&2
    echo "       install them (e.g. sudo apt-get install ${missing[*]}) and run this again" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

export NAPARI_SOCT_CACHE=${NAPARI_SOCT_CACHE:-$(mktemp -d)}
exec xvfb-run -a -s "-screen 0 1280x1024x24" "$PYTHON" -m pytest -p no:cacheprovider "$@"
