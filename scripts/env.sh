# Sourced by the set-up commands, and by you for an interactive shell (`source scripts/env.sh`): creates .venv from
# requirements.lock on first use (again whenever the lock, setup.py or an install script changes in content), then
# activates it. It changes nothing else of the shell that sources it: no shell option, no directory.
# Every package, transitive ones included, is pinned in the lock; torch is its CPU build (scripts/install-torch.sh).
_opendelta_env() {
  local root venv stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${OPENDELTA_VENV:-$root/.venv}"
  stamp="$venv/.installed"
  want=$(bash "$root/scripts/install.sh" --fingerprint "$root/requirements.lock") || return 1
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ -x "$venv/bin/python" ]; then
      echo "set-up: the lock, setup.py or an install script changed: rebuilding $venv (a few minutes)"
    else
      echo "set-up: creating $venv from requirements.lock (first time: about 4 minutes on 2 cores; BMTrain is" \
        "built too where nvcc is)"
    fi
    bash "$root/scripts/install.sh" "$venv" "$root/requirements.lock" || return 1
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  # DeepSpeed's CPU ops, compiled by install.sh
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
}
_opendelta_env
_opendelta_status=$?
unset -f _opendelta_env
if [ "$_opendelta_status" -ne 0 ]; then
  unset _opendelta_status
  return 1
fi
unset _opendelta_status
