"""How train.sbatch turns a Slurm allocation and Hydra overrides into srun + torchrun (no cluster needed).

The multi-node cases run the real script (launch/slurm/train.sbatch with OPENDELTA_DIST_DRY_RUN=1, which
prints the command instead of running it) in the environment Slurm gives a 4-node x 8-GPU job.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm.plan import (
    Allocation,
    PlanError,
    check_overrides,
    expand_hostlist,
    main,
    plan,
    training_overrides,
)
from tests.train.launch import ROOT

SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
ENGINES = sorted(p.stem for p in (ROOT / "configs" / "engine").glob("*.yaml"))

# what Slurm sets in the batch step of `sbatch --nodes=4 --gpus-per-node=8 --exclusive` on 64-core nodes
FOUR_BY_EIGHT = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "4",
    "SLURM_JOB_NODELIST": "gpu[017-020]",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_GPUS_PER_NODE": "8",
    "SLURM_CPUS_ON_NODE": "64",
    "SLURM_NTASKS_PER_NODE": "1",
}


def dry_run(args: list[str], env: dict[str, str], submit_dir: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run train.sbatch as Slurm would run the batch step, printing the command instead of running it."""
    full_env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(submit_dir),
        "PYTHON": sys.executable,
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "OPENDELTA_DIST_DRY_RUN": "1",
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=120)


def printed_command(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    return shlex.split(line[2:])


@pytest.mark.parametrize("engine", ENGINES)
def test_four_nodes_of_eight_gpus_become_one_torchrun_per_node(engine):
    overrides = ["+recipe=lora_t5_11b", f"engine={engine}", "data.train_file=/data/train.jsonl"]
    command = printed_command(dry_run(overrides, FOUR_BY_EIGHT))
    assert command == [
        "srun",
        "--nodes=4",
        "--ntasks=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--kill-on-bad-exit=1",
        sys.executable,
        str(ROOT / "launch" / "slurm" / "torchrun.py"),
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu017:24242",
        "--rdzv_id=4242",
        "--max_restarts=0",
        str(ROOT / "launch" / "train.py"),
        *overrides,
        "run_dir=outputs/lora_t5_11b/slurm-4242",
        "resume=auto",
    ]


def test_the_job_log_names_the_run_and_the_restart_count():
    result = dry_run(["+recipe=lora_t5_11b"], {**FOUR_BY_EIGHT, "SLURM_RESTART_COUNT": "2"})
    assert "job 4242 run 3 (SLURM_RESTART_COUNT=2) on gpu[017-020]" in result.stdout


def test_environment_overrides_for_cpu_nodes_ports_and_restarts():
    env = {
        **{k: v for k, v in FOUR_BY_EIGHT.items() if "GPUS" not in k},
        "NPROC_PER_NODE": "2",
        "RDZV_PORT": "29400",
        "RDZV_HOST": "10.0.0.17",
        "TORCHRUN_MAX_RESTARTS": "3",
        "SLURM_CPUS_PER_TASK": "16",
    }
    command = printed_command(dry_run(["+recipe=lora_t5_tiny"], env))
    for arg in ("--nproc_per_node=2", "--rdzv_endpoint=10.0.0.17:29400", "--max_restarts=3", "--cpus-per-task=16"):
        assert arg in command


def test_gpu_count_with_a_type_and_array_jobs():
    env = {
        "SLURM_JOB_ID": "901",
        "SLURM_ARRAY_JOB_ID": "900",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "a100-[1-2]",
        "SLURM_GPUS_PER_NODE": "gpu:a100:4",
    }
    alloc = Allocation.from_environment(env)
    assert (alloc.nproc_per_node, alloc.nodes, alloc.rdzv_host) == (4, ("a100-1", "a100-2"), "a100-1")
    assert (alloc.job_id, alloc.run_key, alloc.rdzv_port) == ("901", "900_1", 20901)
    command = plan(["+recipe=lora_t5_tiny"], env, python="python")
    assert "run_dir=outputs/lora_t5_tiny/slurm-900_1" in command and "--rdzv_id=901" in command


def test_user_run_dir_and_resume_are_kept():
    assert training_overrides(["+recipe=x", "run_dir=/scratch/a"], "d") == [
        "+recipe=x",
        "run_dir=/scratch/a",
        "resume=auto",
    ]
    assert training_overrides(["+recipe=x", "resume=null"], "d") == ["+recipe=x", "resume=null", "run_dir=d"]


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("gpu[017-020]", ["gpu017", "gpu018", "gpu019", "gpu020"]),
        ("gpu[8-10],login1", ["gpu8", "gpu9", "gpu10", "login1"]),
        ("n[1,3-4]", ["n1", "n3", "n4"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ],
)
def test_slurm_host_lists_expand(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "gpu[1-", "gpu[3-1]", "gpu[a-b]", "gpu]1[", "gpu[[1]]"])
def test_malformed_host_lists_are_refused(spec):
    with pytest.raises(PlanError, match="malformed"):
        expand_hostlist(spec)


def test_every_recipe_composes_for_slurm():
    for recipe in sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")):
        assert check_overrides([f"+recipe={recipe}"])["run_dir"]


BAD_INPUT = [
    (["engine=fsdp"], {}, "no recipe given: add +recipe=NAME"),
    (["+recipe=nope"], {}, "Could not find 'recipe/nope'"),
    (["+recipe=lora_t5_tiny", "engine=nope"], {}, "Could not find 'engine/nope'"),
    (["+recipe=lora_t5_tiny", "train.max_stepz=3"], {}, "Could not override 'train.max_stepz'"),
    (["+recipe=lora_t5_tiny", "optim.lr=1e-3,1e-2"], {}, "Ambiguous value for argument 'optim.lr"),
    (["-m", "+recipe=lora_t5_tiny"], {}, "only Hydra overrides (key=value)"),
    (["+recipe=lora_t5_tiny"], {"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
    (["+recipe=lora_t5_tiny"], {"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": ""}, "has no GPUs"),
    (["+recipe=lora_t5_tiny"], {"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE='eight' is not a positive integer"),
    (["+recipe=lora_t5_tiny"], {"RDZV_PORT": "70000"}, "RDZV_PORT=70000 is not a TCP port"),
    (["+recipe=lora_t5_tiny"], {"SLURM_NNODES": "3"}, "SLURM_NNODES=3 but SLURM_JOB_NODELIST='gpu[017-020]' names 4"),
]


@pytest.mark.parametrize(("args", "env", "message"), BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_exits_2_with_a_clear_error(args, env, message, monkeypatch, capsys):
    for key, value in {**FOUR_BY_EIGHT, **env}.items():
        monkeypatch.setenv(key, value)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.sbatch: error: ") and message in err


def test_the_script_stops_before_srun_on_bad_input():
    result = dry_run(["+recipe=lora_t5_tiny", "engine=nope"], FOUR_BY_EIGHT)
    assert result.returncode == 2 and "Could not find 'engine/nope'" in result.stderr
    assert "+ srun" not in result.stdout


def test_an_engine_without_a_config_is_refused_before_any_node_starts():
    """`engine=bmt` runs as every other engine (a torchrun launch) once configs/engine/bmt.yaml exists;
    until then it is refused with the engines there are."""
    result = dry_run(["+recipe=lora_t5_tiny", "engine=bmt"], FOUR_BY_EIGHT)
    if "bmt" in ENGINES:
        assert result.returncode == 0
    else:
        assert result.returncode == 2 and "Could not find 'engine/bmt'" in result.stderr
        assert all(engine in result.stderr for engine in ENGINES)


def test_the_script_needs_the_repository_and_python(tmp_path):
    result = dry_run(["+recipe=lora_t5_tiny"], {**FOUR_BY_EIGHT, "OPENDELTA_DIST_ROOT": str(tmp_path)})
    assert result.returncode == 2 and f"no opendelta-dist checkout at '{tmp_path}'" in result.stderr
    result = dry_run(["+recipe=lora_t5_tiny"], {**FOUR_BY_EIGHT, "PYTHON": "no-such-python"})
    assert result.returncode == 2 and "no Python interpreter 'no-such-python'" in result.stderr


def test_the_sbatch_defaults_suit_gpu_nodes():
    directives = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--requeue",
        "--open-mode=append",
        "--signal=USR1@120",
    ):
        assert expected in directives
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A Slurm sweep outside any cluster: what fails here fails before anything is submitted."""
    launch = [sys.executable, str(ROOT / "launch" / "train.py"), "-m", "hydra/launcher=slurm"]
    return subprocess.run(
        [*launch, f"hydra.sweep.dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_a_sweep_is_checked_before_it_is_submitted(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    result = sweep(tmp_path, "hydra.launcher.tasks_per_node=8", "+recipe=lora_t5_tiny", "optim.lr=1e-3,1e-2")
    assert result.returncode != 0 and "keep it 1 (one torchrun per node)" in result.stderr
    result = sweep(tmp_path, "+recipe=lora_t5_tiny", "engine=ddp,nope")
    assert result.returncode != 0 and "Could not find 'engine/nope'" in result.stderr


def test_each_sweep_point_gets_its_own_run_directory():
    """Hydra's job directory of the point, or <run_dir>/<job number> when the sweep gives run_dir: never one
    directory for every point (their runs would be refused as a second live run, or mix)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    from launch.hydra_plugins.opendelta_dist_launcher import point_overrides

    task = ["+recipe=lora_t5_tiny", "optim.lr=1e-3"]
    assert point_overrides(task, "/sweep/0", 0) == [*task, "run_dir=/sweep/0", "resume=auto"]
    given = [*task, "run_dir=/runs/lr"]
    assert point_overrides(given, "/sweep/1", 1) == [*task, "run_dir=/runs/lr/1", "resume=auto"]
