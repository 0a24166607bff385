"""scripts/gpu-check.sh where there is no GPU (arguments, the carry list, skipped GPU stages, stage limits) and
the arithmetic of the T5-11B GPU benchmark it runs (tokens/s, MFU, the estimator's configuration)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STAGES = ["env", "install", "tests", "benchmark"]
CARRY_LIMIT = 64 * 2**20
"""What travels to the GPU machine (work tree and carried paths) must stay under 64 MiB."""
benchmark = importlib.import_module("benchmarks.t5_11b_gpu")  # importing it touches no GPU


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script with this interpreter, no carried wheels and a scratch install folder, unless ``env`` says."""
    defaults = {
        "PYTHON": sys.executable,
        "GPU_CHECK_WHL": str(tmp_path / "no-whl"),
        "GPU_CHECK_SITE": str(tmp_path / "site"),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **defaults, **env},
    )


def fake_nvidia_smi(tmp_path: Path, works: bool) -> str:
    """A PATH whose first folder holds an ``nvidia-smi`` that lists a GPU (or fails)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU'\n" if works else "#!/bin/sh\nexit 9\n")
    tool.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def summary(outdir: Path) -> tuple[dict, dict[str, dict]]:
    data = json.loads((outdir / "summary.json").read_text())
    return data, {stage["stage"]: stage for stage in data["stages"]}


def check_what_comes_back(outdir: Path) -> None:
    """What the device tool brings back from $OUT: at most 8 files, named in letters, digits, '.', '_', '-'."""
    files = [p for p in outdir.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected one OUTDIR, got 0 arguments"),
        (["a", "b"], "expected one OUTDIR, got 2 arguments: a b"),
        (["--fast", "out"], "unknown option --fast"),
    ],
)
def test_bad_arguments_print_the_usage_and_exit_2(tmp_path, args, message):
    result = run_script(tmp_path, *args)
    assert result.returncode == 2
    assert f"gpu-check: error: {message}" in result.stderr
    assert "usage: bash scripts/gpu-check.sh [--save-results] OUTDIR" in result.stderr


def test_an_outdir_that_cannot_be_written_is_refused(tmp_path):
    plain_file = tmp_path / "file"
    plain_file.write_text("")
    result = run_script(tmp_path, str(plain_file))
    assert result.returncode == 2 and "exists and is not a folder" in result.stderr
    result = run_script(tmp_path, str(plain_file / "below"))
    assert result.returncode == 2 and "cannot create OUTDIR" in result.stderr


def test_a_stage_limit_that_is_not_a_number_is_refused(tmp_path):
    result = run_script(tmp_path, str(tmp_path / "out"), GPU_CHECK_TIMEOUT_TESTS="soon")
    assert result.returncode == 2
    assert "GPU_CHECK_TIMEOUT_TESTS must be a number of seconds above 0" in result.stderr


def test_help_describes_the_stages_and_the_device_command(tmp_path):
    result = run_script(tmp_path, "--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\s+\(\d+ s\)", result.stdout, re.MULTILINE), stage
    assert 'command: bash scripts/gpu-check.sh "$OUT"' in result.stdout


def test_the_stage_budgets_fit_eight_minutes():
    text = SCRIPT.read_text()
    budgets = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A BUDGET=\((.*)\)", text)[1]))
    assert list(budgets) == STAGES
    assert sum(map(int, budgets.values())) <= 480
    assert "GPU_CHECK_TOTAL:-480" in text


# ----------------------------------------------------------------------------- the carry list


def test_the_carry_list_is_produced_by_fetch_carry_and_travels_under_the_limit(tmp_path):
    result = run_script(tmp_path, "--carry-list")
    assert result.returncode == 0
    carried = result.stdout.split()
    assert carried == [".whl"]
    fetch_carry = ROOT.parent / "shared" / "gpu" / "fetch-carry.sh"
    if fetch_carry.is_file():  # a developer's checkout: the script that fills it writes this folder by default
        assert "DEST=${CARRY_DIR:-.whl}" in fetch_carry.read_text()
    tree = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    size = sum(
        (ROOT / os.fsdecode(name)).stat().st_size for name in tree if name and (ROOT / os.fsdecode(name)).is_file()
    )
    for path in carried:
        folder = ROOT / path
        if not folder.exists():
            assert f"{path} is missing: run 'bash ../shared/gpu/fetch-carry.sh'" in result.stderr
            continue
        # git-ignored, so it is never committed and the device tool sends it only where carry names it
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert (folder / "build-bmtrain.sh").is_file() and list(folder.glob("sdist/bmtrain-*.tar.gz"))
        size += sum(p.stat().st_size for p in files)
    assert size < CARRY_LIMIT, f"{size / 2**20:.1f} MiB would travel"


# ----------------------------------------------------------------------------- runs without a GPU


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_the_gpu_stages_are_skipped_with_the_reason(tmp_path):
    outdir = tmp_path / "out"
    result = run_script(tmp_path, str(outdir))
    assert result.returncode == 0, result.stdout + result.stderr
    data, stages = summary(outdir)
    reason = "no GPU: nvidia-smi is not on PATH (no NVIDIA driver)"
    assert data["finished"] is True and data["gpu"] is None and data["no_gpu_reason"] == reason
    assert stages["env"]["status"] == "ok" and stages["env"]["seconds"] > 0
    assert stages["install"]["status"] == "skipped" and "fetch-carry.sh" in stages["install"]["reason"]
    for stage in ("tests", "benchmark"):
        assert stages[stage] | {"budget_seconds": 0} == {
            "stage": stage,
            "status": "skipped",
            "seconds": None,
            "budget_seconds": 0,
            "reason": reason,
            "log": f"{stage}.log",
        }
        assert (outdir / f"{stage}.log").read_text() == f"skipped: {reason}\n"
    env_log = (outdir / "env.log").read_text()
    assert f"torch {torch.__version__}" in env_log and "(no nvidia-smi on PATH)" in env_log
    check_what_comes_back(outdir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_nvidia_smi_without_cuda_in_torch_is_no_gpu(tmp_path):
    outdir = tmp_path / "out"
    result = run_script(tmp_path, str(outdir), PATH=fake_nvidia_smi(tmp_path, works=True), GPU_CHECK_TIMEOUT_ENV=".1")
    assert result.returncode == 1, result.stdout + result.stderr  # the env stage timed out
    data, stages = summary(outdir)  # valid JSON with the limit written as ".1" was given
    assert stages["env"] | {"seconds": 0} == {**stages["env"], "status": "timeout", "budget_seconds": 0.1, "seconds": 0}
    assert data["no_gpu_reason"] == f"no GPU: torch.cuda.is_available() is False for {sys.executable}"
    assert stages["benchmark"]["reason"] == data["no_gpu_reason"]


def _wheel(folder: Path, name: str) -> None:
    """A one-module wheel ``name`` 1.0 in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": "VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_a_stage_past_its_limit_is_a_timeout_and_the_later_stages_still_run(tmp_path):
    outdir, whl = tmp_path / "out", tmp_path / "whl"
    _wheel(whl, "gpu_check_probe")
    result = run_script(
        tmp_path,
        str(outdir),
        PATH=fake_nvidia_smi(tmp_path, works=False),
        GPU_CHECK_TIMEOUT_ENV="0.1",  # importing torch alone takes longer
        GPU_CHECK_WHL=str(whl),
        GPU_CHECK_IMPORTS="gpu_check_probe",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    data, stages = summary(outdir)
    assert stages["env"]["status"] == "timeout" and "GPU_CHECK_TIMEOUT_ENV" in stages["env"]["reason"]
    assert stages["env"]["budget_seconds"] == 0.1 and stages["env"]["seconds"] < 10
    assert stages["install"]["status"] == "ok", (outdir / "install.log").read_text()
    assert "no bmtrain sdist" in (outdir / "install.log").read_text()
    assert (tmp_path / "site" / "gpu_check_probe.py").is_file()
    assert data["no_gpu_reason"] == "no GPU: nvidia-smi -L fails"
    assert [stages[s]["status"] for s in ("tests", "benchmark")] == ["skipped", "skipped"]
    assert data["finished"] is True
    check_what_comes_back(outdir)


def test_the_tests_stage_leaves_out_the_emulated_tests_and_reports_what_ran_before_its_limit(tmp_path):
    """The tests stage runs ``pytest -m "gpu and not emulated"`` (CI runs the emulated ones), and interrupts it a
    little before the stage's limit: pytest still writes tests.xml with what passed, and the stage is a timeout.
    A stand-in for the interpreter records the arguments and runs, instead of the project's gpu tests, one
    that passes and one that hangs."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_probe.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(600)\n"
    )
    record = tmp_path / "args.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m pytest" ]; then\n'
        f'  printf "%s\\n" "$@" > {record}\n'
        '  for a in "$@"; do case $a in --junitxml) next=1 ;; *) [ -n "${next:-}" ] && xml=$a; next= ;; esac; done\n'
        f'  exec {sys.executable} -m pytest -p no:cacheprovider -q --junitxml "$xml" {tmp_path / "suite"}\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    stand_in.chmod(0o755)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--stage", "tests", str(outdir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": str(stand_in), "STAGE_LIMIT": "25"},
    )
    assert result.returncode == 124, result.stdout + result.stderr
    args = record.read_text().splitlines()
    assert args[args.index("-m", 2) + 1] == "gpu and not emulated"
    cases = {case.get("name"): case for case in ET.parse(outdir / "tests.xml").getroot().iter("testcase")}
    assert "test_quick" in cases and cases["test_quick"].find("failure") is None


def test_a_failing_stage_is_recorded_with_its_last_line(tmp_path):
    outdir, whl = tmp_path / "out", tmp_path / "whl"
    _wheel(whl, "gpu_check_probe")
    result = run_script(
        tmp_path,
        str(outdir),
        GPU_CHECK_TIMEOUT_ENV="0.1",
        GPU_CHECK_WHL=str(whl),
        GPU_CHECK_IMPORTS="gpu_check_no_such_module",
    )
    assert result.returncode == 1
    _, stages = summary(outdir)
    assert stages["install"]["status"] == "failed"
    assert stages["install"]["reason"].endswith("install: FAILED: importing gpu_check_no_such_module")


def test_no_stage_starts_past_the_total_limit_and_nothing_is_saved_without_results(tmp_path):
    outdir = tmp_path / "out"
    results = ROOT / "benchmarks" / "results" / "t5_11b_gpu.json"
    before = results.read_bytes() if results.is_file() else None
    result = run_script(tmp_path, "--save-results", str(outdir), GPU_CHECK_TOTAL="2")
    assert result.returncode == 0, result.stdout + result.stderr
    _, stages = summary(outdir)
    assert stages["env"]["status"] == "skipped" and "(GPU_CHECK_TOTAL)" in stages["env"]["reason"]
    assert "no t5_11b_gpu.json was written, nothing copied" in result.stdout
    assert (results.read_bytes() if results.is_file() else None) == before


# ----------------------------------------------------------------------------- the benchmark's arithmetic


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GH200 480GB", "GH200"),
    ],
)
def test_the_peak_of_known_gpus(name, part):
    peak, found = benchmark.peak_bf16_flops(name)
    assert found == part and peak is not None and peak > 1e14


def test_an_unknown_gpu_gets_no_mfu_and_the_reason():
    result = benchmark.throughput([2.0], 10**15, "Tesla V100-SXM2-32GB")
    assert result["mfu"] is None and "no dense bf16 peak is known for 'Tesla V100-SXM2-32GB'" in result["mfu_reason"]
    assert result["tokens_per_s"] == 8 * (512 + 128) / 2.0


def test_tokens_per_second_and_mfu_use_the_median_step():
    flops = benchmark.model_flops_per_step(100, 200, batch=8, input_tokens=512, target_tokens=128)
    assert flops == 4 * (100 * 512 + 200 * 128) * 8
    result = benchmark.throughput([1.0, 0.5, 4.0], 989.4e12 * 0.25, "NVIDIA H100 80GB HBM3")
    assert result["median_step_seconds"] == 1.0 and result["tokens_per_s"] == 5120.0
    assert result["mfu"] == 0.25 and result["peak_source"] == "H100 SXM"


def test_flop_parameters_leave_out_the_embedding_and_count_the_lm_head():
    import transformers

    config = transformers.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
    encoder, decoder = benchmark.flop_parameters(model)
    # the tied embedding, counted once among the parameters, comes back as the LM head's product
    assert encoder + decoder == sum(p.numel() for p in model.parameters())
    assert encoder == sum(p.numel() for p in model.encoder.parameters()) - 100 * 16


def _engines() -> list[str]:
    from opendelta_dist.train.engines import engine_names

    return engine_names()


@pytest.mark.parametrize(
    "variant",
    [
        "peft",
        "fsdp",
        "deepspeed-zero2",
        "deepspeed-zero3",
        pytest.param("bmt", marks=pytest.mark.skipif("bmt" not in _engines(), reason="no bmt engine")),
    ],
)
def test_the_estimator_runs_each_variant_with_options_its_engine_has(variant):
    from opendelta_dist.estimate import compose
    from opendelta_dist.train.engines import engine_class

    cfg = compose(benchmark.estimator_overrides(variant))
    declared = engine_class(cfg["engine"]["name"]).option_defaults()
    assert set(cfg["engine"]["options"]) <= set(declared)
    assert cfg["model"]["dtype"] == "bf16" and cfg["engine"]["options"]["precision"] == "bf16"
    assert benchmark.engine_options(variant).items() <= cfg["engine"]["options"].items()


def test_the_summary_decides_only_what_was_measured():
    runs = [
        {"variant": "peft", "max_memory_allocated": 2**30, "mfu": 0.2, "within_tolerance": True},
        {"variant": "bmt", "max_memory_allocated": 2**30, "mfu": 0.3, "within_tolerance": False},
        {"variant": "fsdp", "skipped": "deepspeed not installed"},
    ]
    summary_, targets = benchmark.summarise(runs)
    assert summary_["peft"]["peak_allocated_gib"] == 1.0 and summary_["fsdp"] == {"status": "skipped"}
    assert targets == {
        "every_variant_fits_cap": True,
        "estimates_within_tolerance": False,
        "bmt_mfu_above_peft": True,
    }
    _, targets = benchmark.summarise([*runs, {"variant": "deepspeed-zero3", "out_of_memory": "CUDA out of memory"}])
    assert targets["every_variant_fits_cap"] is False
    _, targets = benchmark.summarise([runs[0], {"variant": "bmt", "failed": ["Traceback ..."]}])
    assert targets == {"every_variant_fits_cap": None, "estimates_within_tolerance": True, "bmt_mfu_above_peft": None}


def test_the_driver_stops_variants_at_the_time_budget_and_writes_what_it_has(tmp_path, monkeypatch, capsys):
    # the driver itself never initialises CUDA: it runs here as if there were a GPU; its workers (started with
    # sys.executable) are a program that outlasts their limit of 1 s
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark, "_skip_reason", lambda variant: None)
    slow = tmp_path / "slow-worker"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))
    output = tmp_path / "results.json"
    argv = ["--variants", "fsdp", "peft", "--time-budget", "0.5", "--output", str(output)]
    assert benchmark.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["finished"] is True and [run["variant"] for run in result["runs"]] == ["fsdp", "peft"]
    assert all(run["timeout_seconds"] == 1 and isinstance(run["failed"], list) for run in result["runs"])
    assert result["summary"] == {"fsdp": {"status": "failed"}, "peft": {"status": "failed"}}
    assert set(result["targets"].values()) == {None}
    assert result["configuration"]["model_flops_per_step"] == 105_689_083_019_264
    assert "fsdp: stopped after the time limit" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "slow-worker"]
