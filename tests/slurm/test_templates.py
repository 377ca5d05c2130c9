"""The Slurm templates without a cluster: syntax, shellcheck, and the batch logic (command line,
per-node expansion, signal forwarding, requeue, exit codes) against fake srun/scancel/scontrol.

The real cluster runs are in test_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.conftest import unavailable

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
SCRIPTS = [*TEMPLATES, REPO / "slurm" / "common.sh", REPO / "scripts" / "slurm_cluster.sh"]


def test_the_templates_exist():
    assert {p.name for p in TEMPLATES} >= {"single_node.sbatch", "multi_node.sbatch", "cpu.sbatch", "sweep.sbatch",
                                           "elastic.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck is not installed (apt-get install shellcheck)")
    # -x follows `source slurm/common.sh` (the templates' source-path directive).
    result = subprocess.run(["shellcheck", "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_directives(template):
    text = template.read_text()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --time="):
        assert directive in text, f"{template.name}: no {directive}"
    assert "slurm/common.sh" in text and "mnistdist_slurm_main" in text
    assert "CHANGE" in text  # cluster-specific lines are marked


# --------------------------------------------------------------------------------------
# The batch logic with fake Slurm commands

FAKE_SRUN = r"""#!/bin/bash
# Fake srun: records its arguments; FAKE_MODE says what the "training step" does.
echo $$ >"$FAKE_DIR/srun.pid"
printf '%s\n' "$@" >"$FAKE_DIR/srun.args"
case $FAKE_MODE in
    run)  # run the tasks as srun would: one per node, each with its own SLURM_NODEID
        while [[ $1 != bash ]]; do shift; done
        for n in 0 1; do SLURM_NODEID=$n SLURMD_NODENAME=node$((n + 1)) "$@" >"$FAKE_DIR/task$n.out"; done
        exit 0 ;;
    fail) exit 3 ;;
    preempt)  # like the real step: USR1 or TERM -> checkpoint -> exit 75
        trap 'kill $sleeper; exit 75' USR1 TERM
        sleep 60 & sleeper=$!
        wait
        exit 99 ;;
    terminated)  # SIGTERM: the workers checkpoint, the launcher itself exits 1
        trap 'mkdir -p "$RUN_DIR/checkpoints/step-00000010" && echo {} >"$RUN_DIR/checkpoints/step-00000010/manifest.json"; kill $sleeper; exit 1' TERM
        sleep 60 & sleeper=$!
        wait
        exit 99 ;;
    starting)  # USR1 before the workers handle it: killed by it, no checkpoint
        trap 'kill $sleeper; exit 138' USR1
        sleep 60 & sleeper=$!
        wait
        exit 99 ;;
    lost-node)  # a node's task killed (srun: the worst task's code), the others finished
        mkdir -p "$RUN_DIR" && echo '{}' >"$RUN_DIR/summary.json"
        exit 137 ;;
    finishing)  # training done (summary.json written), USR1 hits the shutdown
        mkdir -p "$RUN_DIR" && echo '{}' >"$RUN_DIR/summary.json"
        trap 'kill $sleeper; exit 138' USR1
        sleep 60 & sleeper=$!
        wait
        exit 99 ;;
esac
"""
FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >>"$FAKE_DIR/calls"
[[ -f $FAKE_DIR/srun.pid ]] || exit 1
kill -USR1 "$(cat "$FAKE_DIR/srun.pid")"
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >>"$FAKE_DIR/calls"
if [[ $1 == show && $2 == hostnames ]]; then echo nodeA; echo nodeB; fi
exit 0
"""


def fake_job(tmp_path: Path, template: str, mode: str, **env: str) -> subprocess.Popen:
    """Run ``bash slurm/TEMPLATE`` as if sbatch had started it, with fake Slurm commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_MODE=mode,
        SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="nodeA,nodeB", RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable,
    )
    environment.update(env)
    return subprocess.Popen(["bash", str(REPO / "slurm" / template)], cwd=tmp_path, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def calls(tmp_path: Path) -> list[str]:
    f = tmp_path / "calls"
    return f.read_text().splitlines() if f.exists() else []


def wait_for_step(tmp_path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(0.3)  # let the fake step install its traps


def test_command_line_and_per_node_machine_rank(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", OVERRIDES="train.epochs=1 train.lr=0.05")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    args = (tmp_path / "srun.args").read_text()
    assert args.startswith("--nodes=2\n--ntasks=2\n--ntasks-per-node=1\n")
    # $SLURM_NODEID stays literal here: each task expands it on its own node.
    assert '--machine_rank "$SLURM_NODEID"' in args
    for n in (0, 1):
        task = (tmp_path / f"task{n}.out").read_text()
        assert f"task on node{n + 1}: machine rank {n}" in task
        assert f"-m mnistdist.launch --machine_rank {n} " in task
        assert ("--num_machines 2 --num_processes 2 --main_process_ip nodeA --main_process_port 24242 "
                "--rdzv_backend static") in task  # 20000 + 4242 % 20000
        assert (f"train_dist.py --config configs/default.yaml --run-dir {tmp_path / 'run'} --resume auto "
                "dist.device=cpu train.epochs=1 train.lr=0.05") in task
    assert "running: srun --nodes=2" in out  # the full command is echoed before it runs
    assert "training finished" in out
    assert not any("requeue" in c for c in calls(tmp_path))


def test_a_one_process_job_is_launched_without_multi_gpu(tmp_path):
    """accelerate refuses --multi_gpu (and the MULTI_GPU config file) for one process in all,
    so a 1-node, 1-process job (cpu.sbatch --nodes=1) takes accelerate's simple launcher."""
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="nodeA")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    task = (tmp_path / "task0.out").read_text()
    assert "-m mnistdist.launch --machine_rank 0 --num_machines 1 --num_processes 1 " in task
    assert "--multi_gpu" not in task and "--config_file" not in task


def test_gpu_template_processes_per_node(tmp_path):
    proc = fake_job(tmp_path, "multi_node.sbatch", "run", PYTHON="/bin/echo", GPUS_PER_NODE="4")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    task = (tmp_path / "task1.out").read_text()
    assert "--machine_rank 1 " in task and "--num_machines 2 --num_processes 8 " in task
    assert "dist.device=cpu" not in task


def test_gpu_template_without_gpus_fails_clearly(tmp_path):
    proc = fake_job(tmp_path, "single_node.sbatch", "run", GPUS_PER_NODE="0", SLURM_JOB_NUM_NODES="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "DEVICE=gpu but no GPUs found" in out, out


def test_nodes_must_match_the_allocation(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "run", NODES="3")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "NODES=3 but the job has 2 node(s)" in out, out


def test_failure_exit_code_is_passed_through(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "fail")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "training failed: the step exited 3" in out, out
    assert not any("requeue" in c for c in calls(tmp_path))


@pytest.mark.parametrize("template", ["cpu.sbatch", "elastic.sbatch"])
def test_usr1_is_forwarded_then_the_job_requeues(tmp_path, template):
    proc = fake_job(tmp_path, template, "preempt")
    wait_for_step(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@LEAD delivers
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert calls(tmp_path)[-2:] == ["scancel --signal=USR1 4242", "scontrol requeue 4242"], calls(tmp_path)


def test_no_requeue_after_max_requeues(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "preempt", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    wait_for_step(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "not requeueing" in out, out
    assert not any("requeue" in c for c in calls(tmp_path))


@pytest.mark.parametrize("mode", ["preempt", "terminated"])
def test_sigterm_waits_for_the_checkpoint_and_does_not_requeue(tmp_path, mode):
    """scancel, the time limit and preemption send SIGTERM to the batch shell AND the step:
    75 when the step wrote a checkpoint (whatever the launchers' own exit codes)."""
    proc = fake_job(tmp_path, "cpu.sbatch", mode)
    wait_for_step(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert "SIGTERM: Slurm is ending this job" in out
    assert not any("requeue" in c for c in calls(tmp_path))


def test_usr1_during_start_up_still_requeues(tmp_path):
    """Workers killed by an early USR1 wrote no checkpoint; the newest valid one is still the
    place to resume, so the job requeues (exit 75), not fails."""
    proc = fake_job(tmp_path, "cpu.sbatch", "starting")
    wait_for_step(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "requeueing anyway" in out, out
    assert calls(tmp_path)[-1] == "scontrol requeue 4242"


def test_usr1_while_a_finished_run_shuts_down_is_success(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "finishing")
    wait_for_step(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "training finished" in out, out
    assert not any("requeue" in c for c in calls(tmp_path))


def test_python_defaults_to_the_checkouts_venv(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "fail", PYTHON="")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    venv = REPO / ".venv" / "bin" / "python"
    expected = str(venv) if os.access(venv, os.X_OK) else "python3"
    assert f"\n{expected}\n--config_file\n" in (tmp_path / "srun.args").read_text()


# --------------------------------------------------------------------------------------
# Numeric knobs: bash arithmetic evaluates a variable's value as an expression, and an array
# subscript in it runs command substitutions, so each knob is checked before any (( )).

# Every template, every numeric variable it reads: (template, knob, extra environment).
# The GPU templates get GPUS_PER_NODE=2 (this machine has no GPUs) unless the knob is a GPU
# count; sweep.sbatch picks DEVICE itself from SLURM_GPUS_ON_NODE (or nvidia-smi).
COMMON_KNOBS = ["NODES", "PROCS_PER_NODE", "THREADS_PER_PROC", "MASTER_PORT", "MAX_REQUEUES", "SLURM_CPUS_PER_TASK",
                "SLURM_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES"]
ELASTIC_KNOBS = ["MIN_NODES", "MAX_RESTARTS", "RDZV_JOIN_TIMEOUT", "RDZV_LAST_CALL_TIMEOUT", "RDZV_KEEP_ALIVE_INTERVAL",
                 "RDZV_KEEP_ALIVE_MAX_ATTEMPT"]
GPUS_2 = {"GPUS_PER_NODE": "2"}
NUMERIC_KNOBS = [
    *[("cpu.sbatch", knob, {}) for knob in COMMON_KNOBS],
    *[(t, knob, GPUS_2) for t in ("single_node.sbatch", "multi_node.sbatch") for knob in COMMON_KNOBS],
    *[(t, knob, {}) for t in ("single_node.sbatch", "multi_node.sbatch") for knob in ("GPUS_PER_NODE",)],
    *[(t, "SLURM_GPUS_ON_NODE", {}) for t in ("single_node.sbatch", "multi_node.sbatch")],
    *[("sweep.sbatch", knob, {}) for knob in [*COMMON_KNOBS, "SLURM_GPUS_ON_NODE", "SLURM_ARRAY_TASK_ID"]],
    ("sweep.sbatch", "GPUS_PER_NODE", {"DEVICE": "gpu"}),
    *[("elastic.sbatch", knob, {}) for knob in [*COMMON_KNOBS, *ELASTIC_KNOBS, "SLURM_GPUS_ON_NODE"]],
    ("elastic.sbatch", "GPUS_PER_NODE", {"DEVICE": "gpu"}),
]


def template_env(tmp_path: Path, template: str) -> dict[str, str]:
    """What a job of TEMPLATE needs here besides fake_job's defaults (sweep.sbatch: a sweep)."""
    if template == "sweep.sbatch":
        return {"SWEEP": str(sweep_file(tmp_path)), "SWEEP_DIR": str(tmp_path / "sw"), "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "nodeA"}
    if template == "single_node.sbatch":
        return {"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "nodeA"}
    return {}


def assert_refused(proc: subprocess.Popen, knob: str) -> str:
    out, _ = proc.communicate(timeout=60)
    lines = out.strip().splitlines()
    assert proc.returncode == 2, out
    assert len(lines) == 1 and f"error: {knob}=" in lines[0], out
    return lines[0]


def preempt_if_started(tmp_path: Path, proc: subprocess.Popen) -> None:
    """Send USR1 once the step runs (so MAX_REQUEUES / SLURM_RESTART_COUNT reach ms_requeue's
    arithmetic), unless the job ends first."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if (tmp_path / "srun.pid").exists():
            time.sleep(0.3)
            proc.send_signal(signal.SIGUSR1)
            return
        time.sleep(0.05)


# `PWD[...]`: a set variable, so `set -u` does not stop bash before it expands the subscript
# (`a[$(...)]` with `a` unset fails as "unbound variable" first, by luck).
@pytest.mark.parametrize("payload", ["PWD[$(touch {marker})]", "a[$(touch {marker})]"], ids=["PWD[]", "a[]"])
@pytest.mark.parametrize("template,knob,extra", NUMERIC_KNOBS,
                         ids=[f"{t.removesuffix('.sbatch')}-{k}" for t, k, _ in NUMERIC_KNOBS])
def test_numeric_knob_injection_is_refused_not_run(tmp_path, template, knob, extra, payload):
    marker = tmp_path / "pwned"
    env = {**template_env(tmp_path, template), **extra, knob: payload.format(marker=marker)}
    proc = fake_job(tmp_path, template, "preempt", **env)
    preempt_if_started(tmp_path, proc)
    try:
        line = assert_refused(proc, knob)
    finally:
        assert not marker.exists(), "the knob's command substitution ran"
    assert "must be a plain non-negative integer" in line, line
    assert not (tmp_path / "srun.args").exists()  # refused before the step


def test_templates_do_no_arithmetic_of_their_own():
    """Arithmetic lives in common.sh, after the values it reads are checked; a template that
    computed with a variable before mnistdist_slurm_main would evaluate it unchecked."""
    for template in TEMPLATES:
        code = [ln for ln in template.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if "((" in ln or "$[" in ln or " let " in f" {ln}"
                    or any(op in ln for op in (" -eq ", " -ne ", " -lt ", " -le ", " -gt ", " -ge "))], template.name


@pytest.mark.parametrize(
    "knob,value,message",
    [
        ("PROCS_PER_NODE", "1+1", "must be a plain non-negative integer"),
        ("PROCS_PER_NODE", "-1", "must be a plain non-negative integer"),
        ("PROCS_PER_NODE", " 2", "must be a plain non-negative integer"),
        ("PROCS_PER_NODE", "08", "must be a plain non-negative integer"),  # bash: octal, "value too great"
        ("PROCS_PER_NODE", "2\n3", "must be a plain non-negative integer"),  # still one line
        ("PROCS_PER_NODE", "0", "PROCS_PER_NODE=0: must be >= 1"),  # 0 divided the CPUs by zero
        ("THREADS_PER_PROC", "0", "THREADS_PER_PROC=0: must be >= 1"),
        ("NODES", "0", "NODES=0: must be >= 1"),
        ("MASTER_PORT", "65536", "must be in 1..65535"),
        ("MAX_REQUEUES", "99999999999999999999", "must be a plain non-negative integer"),  # wraps in bash
        ("NODES", "two", "must be a plain non-negative integer"),
    ],
)
def test_numeric_knob_values(tmp_path, knob, value, message):
    line = assert_refused(fake_job(tmp_path, "cpu.sbatch", "fail", **{knob: value}), knob)
    assert message in line, line


def test_plain_numbers_still_work(tmp_path):
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", PROCS_PER_NODE="3", THREADS_PER_PROC="2",
                    MASTER_PORT="29500", MAX_REQUEUES="0", SLURM_CPUS_PER_TASK="8", SLURM_RESTART_COUNT="0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    task = (tmp_path / "task0.out").read_text()
    assert "--num_processes 6 " in task and "--main_process_port 29500 " in task
    assert "--num_cpu_threads_per_process 2 " in task


@pytest.mark.parametrize("knob,value", [
    ("REPO", "/nonexistent"),
    ("REPO", ""),  # and no SLURM_SUBMIT_DIR: not submitted from a checkout
    ("DEVICE", "gpu\nrm -rf"),  # one line even so
    ("DEVICE", "tpu"),
    ("CONFIG", "configs/missing.yaml\nsecond line"),
    ("PYTHON", "/nonexistent/python"),
    ("RESUME", "/nonexistent/checkpoint"),
    ("LAUNCH_CONFIG", "/nonexistent/accelerate.yaml"),
    ("SLURM_JOB_ID", ""),  # not inside a Slurm job
    ("SLURM_JOB_NODELIST", ""),  # and no MASTER_ADDR: no first node to host the rendezvous
])
def test_a_bad_knob_is_one_line_and_exit_2_before_the_step(tmp_path, knob, value):
    env = {knob: value, **({"SLURM_SUBMIT_DIR": ""} if knob == "REPO" and not value else {})}
    # "fail": were the knob let through, the fake step would exit at once (and srun.args tell).
    proc = fake_job(tmp_path, "cpu.sbatch", "fail", **env)
    out, _ = proc.communicate(timeout=60)
    lines = out.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, out
    assert f"error: {knob}" in lines[0], out  # "KNOB=value: ..." or "KNOB is not set ..."
    assert not (tmp_path / "srun.args").exists()


def test_odd_but_valid_values_are_taken_literally(tmp_path):
    """OVERRIDES split at any whitespace, newlines too (read -a alone stops at the first
    newline and drops the rest); a RUN_DIR that starts with '-' is a directory name, not an
    option of realpath."""
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", RUN_DIR="-odd",
                    OVERRIDES="train.epochs=1\ntrain.lr=0.05\ttrain.seed=3 ", LAUNCH_ARGS="--debug\n--quiet")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    task = (tmp_path / "task0.out").read_text()
    assert f"--run-dir {REPO}/-odd --resume auto dist.device=cpu train.epochs=1 train.lr=0.05 train.seed=3\n" in task
    assert "--dynamo_backend no --debug --quiet train_dist.py" in task


def test_the_step_gets_the_jobs_cpus_per_task(tmp_path):
    """srun does not take --cpus-per-task from sbatch (Slurm 22.05 stopped reading
    SLURM_CPUS_PER_TASK): without it the step may get one CPU while THREADS_PER_PROC counts
    them all. (The real cluster's tasks: test_cluster.py.)"""
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", SLURM_CPUS_PER_TASK="8", PROCS_PER_NODE="2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--cpus-per-task=8" in args[:args.index("bash")], args
    assert "--num_cpu_threads_per_process 4 " in (tmp_path / "task0.out").read_text()
    # Without --cpus-per-task the job's tasks have 1 CPU each, and so has the step's.
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert not [a for a in (tmp_path / "srun.args").read_text().splitlines() if a.startswith("--cpus-per-task")]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_memory_is_a_line_to_change(template):
    [line] = [ln for ln in template.read_text().splitlines() if ln.startswith(("#SBATCH --mem", "##SBATCH --mem"))]
    assert line.startswith("#SBATCH --mem=") and "CHANGE" in line, line


# --------------------------------------------------------------------------------------
# elastic.sbatch: torchrun's agent on each node, c10d rendezvous, srun --no-kill

def test_elastic_command_line(tmp_path):
    proc = fake_job(tmp_path, "elastic.sbatch", "run", PYTHON="/bin/echo", OVERRIDES="train.epochs=1",
                    SLURM_CPUS_PER_TASK="4", PROCS_PER_NODE="2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    args = (tmp_path / "srun.args").read_text().splitlines()
    # --no-kill: a failed node ends neither the step nor the job; the job's CPUs; threads per
    # process through OMP_NUM_THREADS, which torchrun keeps.
    assert args[:args.index("bash")] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=4",
                                         "--no-kill", "--kill-on-bad-exit=0", "--export=ALL,OMP_NUM_THREADS=2"], args
    assert "elastic, 1..2 node(s) x 2 process(es)" in out
    for n in (0, 1):
        task = (tmp_path / f"task{n}.out").read_text()
        host = "true" if n == 0 else "false"  # exactly one task hosts the rendezvous store: the first node's
        assert f"task on node{n + 1}: node {n}, rendezvous store host: {host}" in task
        assert ("-m mnistdist.launch torchrun --rdzv-conf join_timeout=600,last_call_timeout=5,keep_alive_interval=1,"
                f"keep_alive_max_attempt=3,is_host={host} --nnodes 1:2 --nproc-per-node 2 --max-restarts 3 "
                "--rdzv-backend c10d --rdzv-endpoint nodeA:24242 --rdzv-id 4242 train_dist.py --config "
                f"configs/default.yaml --run-dir {tmp_path / 'run'} --resume auto dist.device=cpu train.epochs=1\n") in task
        assert "--machine_rank" not in task  # ranks come from the rendezvous


def test_elastic_knobs_reach_torchrun(tmp_path):
    proc = fake_job(tmp_path, "elastic.sbatch", "run", PYTHON="/bin/echo", MIN_NODES="2", MAX_RESTARTS="0",
                    RDZV_JOIN_TIMEOUT="30", RDZV_LAST_CALL_TIMEOUT="1", RDZV_KEEP_ALIVE_INTERVAL="5",
                    RDZV_KEEP_ALIVE_MAX_ATTEMPT="2", MASTER_ADDR="head", MASTER_PORT="29500",
                    LAUNCH_ARGS="--monitor-interval 1", LAUNCH_CONFIG="/nonexistent/unused.yaml")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    task = (tmp_path / "task1.out").read_text()
    assert ("--rdzv-conf join_timeout=30,last_call_timeout=1,keep_alive_interval=5,keep_alive_max_attempt=2,"
            "is_host=false --nnodes 2:2 --nproc-per-node 1 --max-restarts 0 --rdzv-backend c10d "
            "--rdzv-endpoint head:29500 --rdzv-id 4242 --monitor-interval 1 train_dist.py ") in task, task


@pytest.mark.parametrize("knob,value,message", [
    ("MIN_NODES", "3", "MIN_NODES=3: must be in 1..2"),  # more than the job has
    ("MIN_NODES", "0", "MIN_NODES=0: must be in 1..2"),
    ("MAX_RESTARTS", "1001", "MAX_RESTARTS=1001: must be in 0..1000"),
    ("RDZV_LAST_CALL_TIMEOUT", "0", "RDZV_LAST_CALL_TIMEOUT=0: must be in 1..86400"),  # torch refuses 0
    ("RDZV_JOIN_TIMEOUT", "1e3", "must be a plain non-negative integer"),
    ("RDZV_KEEP_ALIVE_INTERVAL", "0.5", "must be a plain non-negative integer"),
    ("RDZV_KEEP_ALIVE_MAX_ATTEMPT", "0", "RDZV_KEEP_ALIVE_MAX_ATTEMPT=0: must be in 1..1000"),
])
def test_elastic_knob_values(tmp_path, knob, value, message):
    line = assert_refused(fake_job(tmp_path, "elastic.sbatch", "fail", **{knob: value}), knob)
    assert message in line, line
    assert not (tmp_path / "srun.args").exists()


def test_elastic_knobs_are_read_by_elastic_sbatch_only(tmp_path):
    """A fixed-size template ignores them (and MS_ELASTIC from the environment)."""
    proc = fake_job(tmp_path, "cpu.sbatch", "run", PYTHON="/bin/echo", MIN_NODES="x", MS_ELASTIC="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--machine_rank 0 " in (tmp_path / "task0.out").read_text()


@pytest.mark.parametrize("template,code", [("elastic.sbatch", 0), ("cpu.sbatch", 137)])
def test_a_lost_nodes_task_after_a_finished_training(tmp_path, template, code):
    """srun exits with its worst task's code: under elastic.sbatch a node lost on the way
    (its task killed) while the nodes left finished the training is success; a fixed-size
    job has no such case, and a non-zero step stays a failure."""
    proc = fake_job(tmp_path, template, "lost-node")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    if code == 0:
        assert "training finished" in out and "the job went on without it" in out, out


def test_elastic_failure_without_a_finished_training_is_passed_through(tmp_path):
    proc = fake_job(tmp_path, "elastic.sbatch", "fail")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "training failed: the step exited 3" in out, out


def sweep_file(tmp_path: Path, text: str = "grid: {train.lr: [0.05, 0.1]}\nseeds: [0, 1]\n", name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_sweep_task_trains_its_run_through_the_launcher(tmp_path):
    path = sweep_file(tmp_path)
    # (The fake step exits 3 at once: only its command line matters here.)
    proc = fake_job(tmp_path, "sweep.sbatch", "fail", SWEEP=str(path), SWEEP_DIR=str(tmp_path / "sw"),
                    SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="4240", SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="nodeA", OVERRIDES="train.epochs=1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    args = (tmp_path / "srun.args").read_text().splitlines()
    program = args[args.index("-m", args.index("--dynamo_backend")):]
    # no GPUs here: DEVICE defaults to cpu
    assert program == ["-m", "mnistdist.cli", "sweep", str(path), "--out", str(tmp_path / "sw"), "--run", "2",
                       "dist.device=cpu", "train.epochs=1"], args
    assert f"array task 4240_2: run 2 of {path}" in out
    assert f"run dir {tmp_path / 'sw' / 'train.lr=0.1-seed0'}" in out  # the run's own directory


@pytest.mark.parametrize("env, message", [
    ({}, "SWEEP is not set: sbatch --array=0-N"),
    ({"SWEEP": "SWEEPFILE"}, "but this is not an array job"),
    ({"SWEEP": "SWEEPFILE", "SLURM_ARRAY_TASK_ID": "4"}, "no run 4: the sweep has 4 runs (0-3)"),
    ({"SWEEP": "BADFILE", "SLURM_ARRAY_TASK_ID": "0"}, "unknown key 'seed'"),
])
def test_sweep_task_errors_are_one_line_exit_2(tmp_path, env, message):
    files = {"SWEEPFILE": sweep_file(tmp_path), "BADFILE": sweep_file(tmp_path, "seed: [1]\n", name="bad")}
    env = {k: str(files.get(v, v)) for k, v in env.items()}
    proc = fake_job(tmp_path, "sweep.sbatch", "run", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="nodeA", **env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "srun.args").exists()


def test_sweep_task_of_a_finished_run_exits_0_without_a_step(tmp_path):
    path = sweep_file(tmp_path)
    run_dir = tmp_path / "sw" / "train.lr=0.05-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}\n")
    proc = fake_job(tmp_path, "sweep.sbatch", "fail", SWEEP=str(path), SWEEP_DIR=str(tmp_path / "sw"),
                    SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="nodeA")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"run 1 (train.lr=0.05-seed1) finished before ({run_dir}/summary.json); skipped" in out
    assert not (tmp_path / "srun.args").exists()


def test_sweep_task_of_a_stale_run_stops_in_one_line_and_sees_the_overrides(tmp_path):
    from mnistdist.config import load_config, to_yaml
    from mnistdist.tools import sweep

    path = sweep_file(tmp_path)
    run = sweep.load_sweep(path, tmp_path / "sw").elements[1]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(to_yaml(load_config(run.config, [*run.overrides, "train.epochs=1"])))
    (run.run_dir / "summary.json").write_text("{}\n")
    task = dict(SWEEP=str(path), SWEEP_DIR=str(tmp_path / "sw"), SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NUM_NODES="1",
                SLURM_JOB_NODELIST="nodeA")
    # Trained with OVERRIDES=train.epochs=1: a task given the same OVERRIDES finds it finished.
    proc = fake_job(tmp_path, "sweep.sbatch", "fail", OVERRIDES="train.epochs=1", **task)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "finished before" in out, out
    # Without them the run is not what the sweep gives: never skipped as finished.
    proc = fake_job(tmp_path, "sweep.sbatch", "fail", **task)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "train.epochs: 1 -> 10" in out and "--out DIR" in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "srun.args").exists()
