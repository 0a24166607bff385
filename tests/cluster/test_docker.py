"""The Docker images: what they install (read from the Dockerfiles), and the CPU image built for real
and running the tests inside it (podman, marked slow: a few minutes).

The build uses the host's pip settings (index, find-links, CA bundle: read from ``pip config``) and a
Debian base made with docker/debian-base.sh when no registry can be reached.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.train.launch import ROOT

GPU = ROOT / "docker" / "Dockerfile"
CPU = ROOT / "docker" / "Dockerfile.cpu"
IMAGE = "localhost/opendelta-dist:cpu-test"
BASE = "localhost/debian:bookworm-slim"


def extras_declared() -> set[str]:
    """The extras of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {key.value for key in node.value.keys}
    raise AssertionError("setup.py declares no extras_require")


def installed_extras(dockerfile: Path) -> set[str]:
    (extras,) = re.findall(r'pip install -c constraints.txt -e "\.\[([a-z,]+)\]"', dockerfile.read_text())
    return set(extras.split(","))


def test_the_images_run_ci_set_up_and_the_gpu_image_adds_every_extra():
    for dockerfile in (GPU, CPU):
        assert "RUN bash -c 'source scripts/env.sh'" in dockerfile.read_text()  # the dev extra, as in CI
    assert installed_extras(GPU) == extras_declared()


@pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=["gpu_image", "cpu_image"])
def test_images_pin_torch_first_and_run_as_a_user_in_a_copy_of_the_repository(dockerfile):
    text = dockerfile.read_text()
    torch_step = text.index("grep '^torch==' constraints.txt")
    assert torch_step < text.index("source scripts/env.sh")  # everything else against that torch
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and "root" not in users and users[-1] == "delta"
    assert "COPY --chown=delta:delta . ." in text and "WORKDIR /opt/opendelta-dist" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "outputs", ".git"} <= set(ignored) and "recipes" not in ignored


def test_the_gpu_image_builds_bmtrain_for_the_target_architectures():
    """With the set-up's own script (scripts/install-bmt.sh, tested in tests/bmt), for CUDA_ARCHS."""
    text = GPU.read_text()
    assert 'ARG CUDA_ARCHS="80;90"' in text
    assert 'BMT_CUDA_ARCHS="${CUDA_ARCHS}" BUILD_DOCKER_ENV=1' in text
    assert "bash scripts/install-bmt.sh /opt/venv/bin/python" in text
    assert text.index("bash scripts/install-bmt.sh") > text.index("grep '^torch==' constraints.txt")  # torch's NCCL
    script = ROOT / "scripts" / "install-bmt.sh"
    result = subprocess.run(
        ["bash", str(script)], env={**os.environ, "BMT_CUDA_ARCHS": "sm_90"}, capture_output=True, text=True
    )
    assert result.returncode == 2 and "give compute capabilities like" in result.stderr


def pip_settings() -> dict[str, str]:
    """This machine's pip settings (``pip config list`` and PIP_* variables), by option name."""
    result = subprocess.run(["pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
        if match:
            settings[match.group(1)] = match.group(2)
    for option in ("index-url", "extra-index-url", "find-links", "cert"):
        value = os.environ.get("PIP_" + option.upper().replace("-", "_"))
        if value:
            settings[option] = value
    return settings


def build_arguments(settings: dict[str, str]) -> list[str]:
    """Build arguments (and read-only mounts) that hand the host's pip settings to the build: remote
    indexes, find-links directories, the CA bundle. Local ``file://`` indexes are left out (their
    pages link outside the directory named); the build then uses the network index."""
    args: list[str] = []
    for option in ("index-url", "extra-index-url"):
        remote = [url for url in settings.get(option, "").split() if url.startswith(("http://", "https://"))]
        if remote:
            args += ["--build-arg", f"PIP_{option.upper().replace('-', '_')}={' '.join(remote)}"]
    links = [p for p in settings.get("find-links", "").split() if p.startswith("/") and Path(p).is_dir()]
    if links:
        args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
        args += [arg for path in links for arg in ("-v", f"{path}:{path}:ro")]
        if any(Path(p).glob("torch-*+cpu-*.whl") for p in links):
            args += ["--build-arg", "TORCH_INDEX_URL="]  # torch's CPU wheel is there
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        args += ["--build-arg", "PIP_CERT=/etc/ssl/host-ca.crt", "-v", f"{cert}:/etc/ssl/host-ca.crt:ro"]
    return args


def podman(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_image() -> str:
    """The CPU image, built with podman from this checkout (skipped, with the reason, where it cannot be)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (no Docker engine here): apt-get install podman buildah runc ...")
    if os.geteuid() != 0:
        pytest.skip("building images with podman here needs root (no user namespaces configured)")
    if podman("image", "exists", BASE).returncode != 0:
        made = subprocess.run(["bash", str(ROOT / "docker" / "debian-base.sh"), BASE], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"no base image: no registry, and debian-base.sh failed: {made.stderr[-500:]}")
    build = podman(
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "-f",
        str(CPU),
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        *build_arguments(pip_settings()),
        "-t",
        IMAGE,
        str(ROOT),
    )
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-3000:]
    return IMAGE


def run_in(image: str, *command: str, timeout: int = 3600) -> subprocess.CompletedProcess[str]:
    """Run a command in the image without network, as its user (runc and low limits: see docker/README.md)."""
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    limits = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
    return podman(
        *runtime, "run", "--rm", "--network", "none", "--shm-size=1g", *limits, image, *command, timeout=timeout
    )


@pytest.mark.slow
def test_the_cpu_image_runs_lint_and_the_fast_tests_offline(cpu_image):
    who = run_in(cpu_image, "bash", "-c", "id -un; python -c 'import torch; print(torch.__version__)'")
    assert who.returncode == 0, who.stderr
    user, torch_version = who.stdout.split()
    pinned = (ROOT / "constraints.txt").read_text().split("torch==")[1].split()[0]
    assert user == "delta" and torch_version.split("+")[0] == pinned
    # the image's default command is CI's test command; here without the multi-process tests
    result = run_in(cpu_image, "bash", "scripts/test.sh", "-x", "-m", "not slow and not gpu")  # test.sh adds -q
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.slow
def test_the_cpu_image_trains_the_default_recipe(cpu_image):
    result = run_in(
        cpu_image,
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "launch/train.py",
        "+recipe=lora_t5_tiny",
        "train.max_steps=4",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "saved the final delta to /opt/opendelta-dist/outputs/lora_t5_tiny/final_delta" in result.stdout
