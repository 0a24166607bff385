"""The set-up on a user's machine: torch's CPU build from PyTorch's CPU index (or a local wheel folder, without
waiting on the index), Python 3.11+ named when missing, a rebuild only when what it is made from changed in
content, and ``source scripts/env.sh`` leaving the user's shell as it was."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
TORCH_PIN = next(line.strip() for line in LOCK.read_text().splitlines() if line.startswith("torch=="))


def _local_torch_wheel() -> Path | None:
    """The pinned torch wheel in a folder pip's find-links names here, if any."""
    version = TORCH_PIN.split("==")[1]
    folders = [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]
    for folder in map(Path, folders):
        for wheel in sorted(folder.glob(f"torch-{version}-cp{sys.version_info.major}{sys.version_info.minor}-*.whl")):
            return wheel
    return None


WHEEL = _local_torch_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"no {TORCH_PIN} wheel on this machine to serve")


def _without_pip_configuration(**extra: str) -> dict[str, str]:
    """A user's environment: none of this machine's pip settings (its local wheel folder and mirrors)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


class _Index(http.server.BaseHTTPRequestHandler):
    """PyTorch's CPU index, as it serves torch: a PEP 503 project page linking the wheels under ``/whl/cpu/``."""

    wheel: Path
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        name = quote(self.wheel.name)
        if self.path.rstrip("/") == "/whl/cpu/torch":
            body = f'<html><body><a href="/whl/cpu/{name}">{self.wheel.name}</a></body></html>'.encode()
            self._send(body, "text/html")
        elif self.path == f"/whl/cpu/{name}":
            self._send(self.wheel.read_bytes(), "application/octet-stream")
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def torch_index() -> Iterator[tuple[str, list[str]]]:
    handler = type("Index", (_Index,), {"wheel": WHEEL, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu", handler.requests
    server.shutdown()


@pytest.fixture
def fresh_python(tmp_path: Path) -> str:
    """The interpreter of a new environment without torch, as the set-up makes it."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    return str(tmp_path / "venv" / "bin" / "python")


def _install_torch(python: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    # pip's own options from the environment: resolve and fetch the wheel, install nothing (the suite's time)
    env = {**env, "PIP_DRY_RUN": "1"}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-torch.sh"), python, str(LOCK)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
@needs_wheel
def test_torch_comes_from_pytorchs_cpu_index_without_this_machines_pip_configuration(torch_index, fresh_python):
    """The lock pins torch's CPU build, which PyPI does not have: with no local wheel folder, it is fetched from
    the torch index (PyTorch's CPU index by default; here a local one that serves it the same way)."""
    url, requests = torch_index
    result = _install_torch(fresh_python, _without_pip_configuration(OPENDELTA_TORCH_INDEX=url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {url}" in result.stdout
    assert f"Would install torch-{TORCH_PIN.split('==')[1]}" in result.stdout
    assert any(path.endswith(".whl") for path in requests), requests


@needs_wheel
def test_a_local_wheel_folder_is_used_without_asking_the_index(fresh_python):
    """Where pip's find-links holds the wheel, the torch index is never asked: an unreachable one costs nothing."""
    env = _without_pip_configuration(
        PIP_FIND_LINKS=str(WHEEL.parent), OPENDELTA_TORCH_INDEX="http://127.0.0.1:9/unreachable"
    )
    started = time.monotonic()
    result = _install_torch(fresh_python, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from a local wheel folder" in result.stdout
    assert time.monotonic() - started < 60


def test_an_unreachable_torch_index_fails_with_what_to_set(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==0.0.1+cpu\n")  # no wheel anywhere has it
    env = _without_pip_configuration(OPENDELTA_TORCH_INDEX="http://127.0.0.1:9/unreachable")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-torch.sh"), sys.executable, str(lock)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PIP_DRY_RUN": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"},
    )
    assert result.returncode == 1
    assert "set OPENDELTA_TORCH_INDEX to an index that has it" in result.stderr


def test_an_old_python_is_named_before_anything_is_made(tmp_path):
    old = tmp_path / "python3.10"  # an interpreter that fails the 3.11 check and says it is 3.10.12
    old.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.10.12 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), str(venv), str(LOCK)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": str(old)},
    )
    assert result.returncode == 1
    assert f"needs Python 3.11 or newer; {old} is 3.10.12" in result.stderr
    assert "PYTHON=" in result.stderr and not venv.exists()


def _repository_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    for name in ("setup.py", "requirements.lock"):
        shutil.copy(ROOT / name, copy / name)
    for script in (ROOT / "scripts").iterdir():
        shutil.copy(script, copy / "scripts" / script.name)
    return copy


def test_the_environment_is_rebuilt_when_what_it_is_made_from_changes_in_content_not_in_time(tmp_path):
    copy = _repository_copy(tmp_path)

    def fingerprint() -> str:
        out = subprocess.run(
            ["bash", "scripts/install.sh", "--fingerprint", "requirements.lock"],
            cwd=copy,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and len(out.stdout.strip()) == 64, out.stderr
        return out.stdout.strip()

    first = fingerprint()
    later = time.time() + 60
    for name in ("requirements.lock", "setup.py", "scripts/install.sh"):
        os.utime(copy / name, (later, later))  # what `bash scripts/lock.sh` or a checkout does to an unchanged file
    assert fingerprint() == first
    for name in ("requirements.lock", "setup.py", "scripts/install.sh", "scripts/install-torch.sh"):
        original = (copy / name).read_text()
        (copy / name).write_text(original + "\n# changed\n")
        assert fingerprint() != first, name
        (copy / name).write_text(original)
    assert fingerprint() == first


def test_sourcing_env_sh_leaves_the_shell_as_it_was(tmp_path):
    """``source scripts/env.sh`` in an interactive shell activates the environment and nothing else: no shell option
    (a failing command afterwards must not close the terminal), no change of directory."""
    venv = Path(os.environ.get("OPENDELTA_VENV", ROOT / ".venv"))
    fingerprint = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--fingerprint", str(LOCK)], capture_output=True, text=True
    ).stdout.strip()
    stamp = venv / ".installed"
    if not stamp.is_file() or stamp.read_text().strip() != fingerprint:
        pytest.skip(f"{venv} is not the set-up's current environment (sourcing env.sh would rebuild it)")
    script = f'before=$-; source {ROOT}/scripts/env.sh; echo "options $before $-"; pwd; false; echo still here'
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-i", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OPENDELTA_VENV": str(venv)},
    )
    lines = result.stdout.splitlines()
    options = next(line for line in lines if line.startswith("options ")).split()
    assert options[1] == options[2], result.stdout
    assert str(tmp_path) in lines and "still here" in lines, result.stdout + result.stderr
