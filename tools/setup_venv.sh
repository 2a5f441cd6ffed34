#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs mfmegatron with its test extras.
#
#   bash tools/setup_venv.sh            # CPU/dev install: .[test]
#   EXTRAS=test,gpu bash tools/setup_venv.sh
#
# megatron-core >= 0.17 needs Python >= 3.12. This looks for one on PATH (python3.13, python3.12,
# python3, python), then among pyenv's installed versions. Set PYTHON=/path/to/python to choose.
set -euo pipefail
cd "$(dirname "$0")/.."

is_recent_python() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    is_recent_python "$PYTHON" && { echo "$PYTHON"; return; }
    echo "PYTHON=$PYTHON is not Python >= 3.12" >&2; return 1
  fi
  for candidate in python3.13 python3.12 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && is_recent_python "$candidate"; then
      command -v "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | sort -t. -k1,1n -k2,2n -k3,3n -r); do
      candidate="$(pyenv root)/versions/$version/bin/python3"
      if [ -x "$candidate" ] && is_recent_python "$candidate"; then
        echo "$candidate"; return
      fi
    done
  fi
  cat >&2 <<'MSG'
No Python >= 3.12 found (megatron-core >= 0.17 needs it). Install one, for example with pyenv:
    pyenv install 3.12 && PYTHON="$(pyenv root)/versions/$(pyenv latest 3.12)/bin/python3" bash tools/setup_venv.sh
or point PYTHON at an existing interpreter.
MSG
  return 1
}

python="$(find_python)"
echo "using $python ($("$python" --version 2>&1))"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS:-test}]"
case ",${EXTRAS:-test}," in
  *,test,*)
    # The independent HunyuanImage 3.0 reference of tests/test_hunyuan_image3_image.py: NeMo
    # Automodel's pure-Python port. Without its dependencies (their pins would replace torch);
    # what the port imports is already installed.
    .venv/bin/python -m pip install --quiet --no-deps "nemo-automodel==0.7.0" ;;
esac
echo "ready: .venv ($(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
