#!/usr/bin/env bash
# Sets up everything the tests, the benchmarks and the app need, on Debian/Ubuntu or macOS:
#   - system tools: espeak-ng and sox (real speech for the long-audio tests), Chromium (the app's
#     browser test), a C++ compiler (the Metal-kernel CPU emulator compiles kernel sources);
#   - a virtual environment in .venv with the package and its dev extra (editable).
# Safe to run again: it installs only what is missing. Users who only want to run the model need none of
# this: `pip install mlx-unified` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else say "need root for: $*  (run this script as root, or install sudo)"; exit 1
  fi
}

debian_tools() {
  # command -> the Debian package that provides it
  local missing=()
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v sox >/dev/null || missing+=(sox)
  command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v "${CXX:-g++}" >/dev/null || missing+=(g++)
  "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
  if [ ${#missing[@]} -eq 0 ]; then
    say "system tools present: espeak-ng, sox, chromium, ${CXX:-g++}"
    return
  fi
  say "installing with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

macos_tools() {
  if ! command -v "${CXX:-c++}" >/dev/null || ! xcode-select -p >/dev/null 2>&1; then
    say "a C++ compiler is missing: run 'xcode-select --install', then this script again"
    exit 1
  fi
  local missing=()
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v sox >/dev/null || missing+=(sox)
  if [ ${#missing[@]} -gt 0 ]; then
    command -v brew >/dev/null || { say "Homebrew is needed for ${missing[*]}: https://brew.sh"; exit 1; }
    say "installing with Homebrew: ${missing[*]}"
    brew install "${missing[@]}"
  else
    say "system tools present: espeak-ng, sox, ${CXX:-c++}"
  fi
}

case "$(uname -s)" in
  Linux)
    if command -v apt-get >/dev/null; then debian_tools
    else say "not Debian/Ubuntu: install espeak-ng, sox, chromium and a C++ compiler yourself"; fi ;;
  Darwin) macos_tools ;;
  *) say "unsupported system $(uname -s)"; exit 1 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
say "installing mlx-unified with its dev extra into $VENV (the reference: torch, transformers; the peers: mlx-vlm)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"

if [ "$(uname -s)" = Darwin ]; then
  # No system Chromium on a Mac: the browser test uses Playwright's own.
  say "installing Playwright's Chromium for the browser test"
  "$VENV/bin/python" -m playwright install chromium
fi
say "done. Run the tests with: $VENV/bin/python -m pytest"
