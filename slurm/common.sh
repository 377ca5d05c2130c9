# shellcheck shell=bash
# Shared logic of the Slurm templates in this directory (single_node.sbatch, multi_node.sbatch,
# cpu.sbatch, sweep.sbatch, elastic.sbatch). Sourced by them; not meant to be run on its own.
#
# What a job does:
#   1. reads the knobs below (environment variables, each with a default),
#   2. starts ONE `srun` step with one task per node; each task runs
#        python -m mnistdist.launch --machine_rank $SLURM_NODEID ... train_dist.py ...
#      ($SLURM_NODEID is expanded by the task on its own node, not here); elastic.sbatch runs
#        python -m mnistdist.launch torchrun --nnodes MIN_NODES:NODES ... train_dist.py ...
#      instead (torchrun's c10d rendezvous, `srun --no-kill`: a lost node does not end the
#      step; the agents left re-form the job and resume from the newest checkpoint),
#   3. waits for it. On SIGUSR1 (sent to this batch shell by `#SBATCH --signal=B:USR1@LEAD`
#      before the time limit, or by `scancel --signal=USR1 --batch JOB`) it passes USR1 on to
#      every process of the training step; the ranks finish their step, agree, write a
#      checkpoint and exit 75; then this script requeues the job (`scontrol requeue`), which
#      starts again later with the same job id, so the same RUN_DIR and rendezvous port, and
#      continues from the checkpoint (--resume auto) and in the same W&B run.
#   Exit status: 0 only when training finished (under elastic.sbatch also when a lost node's
#   task made the step exit non-zero on the way); 75 when it stopped with a checkpoint written
#   (requeued, or not requeued because MAX_REQUEUES was reached or Slurm itself is ending the
#   job); anything else is a failure.
#
# Knobs (export them before `sbatch`, or `sbatch --export=ALL,NAME=value ...`):
#   REPO            the mnistdist checkout, on a filesystem every node sees
#                   (default: the directory sbatch was run from, $SLURM_SUBMIT_DIR)
#   PYTHON          a python with mnistdist installed (default: $REPO/.venv/bin/python, else python3)
#   DEVICE          gpu | cpu | auto (gpu when the node has GPUs, else cpu) (default: set by the template)
#   NODES           number of nodes to train on; must equal the allocation (default: $SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE   DEVICE=gpu: GPUs per node (default: $SLURM_GPUS_ON_NODE, else `nvidia-smi -L`)
#   PROCS_PER_NODE  training processes per node (default: GPUS_PER_NODE for gpu, 1 for cpu)
#   THREADS_PER_PROC  CPU threads per training process (default: $SLURM_CPUS_PER_TASK / PROCS_PER_NODE, at least 1)
#   CONFIG          training config (default: configs/default.yaml)
#   OVERRIDES       section.key=value overrides separated by spaces or newlines (default: none)
#   RUN_DIR         run directory, shared by all nodes (default: runs/slurm-$SLURM_JOB_ID;
#                   the job id survives a requeue, so a requeued job finds its checkpoints)
#   RESUME          auto | never | PATH, passed to --resume (default: auto)
#   MASTER_ADDR     rendezvous host (default: the first node of the job)
#   MASTER_PORT     rendezvous port (default: 20000 + SLURM_JOB_ID % 20000, so two jobs that
#                   share a node do not collide)
#   LAUNCH_CONFIG   accelerate config file (default: configs/accelerate/cpu.yaml: MULTI_GPU
#                   workers, NCCL on GPU nodes and gloo on CPU-only nodes; it also keeps a
#                   personal ~/.cache/huggingface/accelerate config out of the job)
#   LAUNCH_ARGS     extra `accelerate launch` arguments (default: none)
#   MAX_REQUEUES    stop requeueing after this many restarts (default: 20)
#   SWEEP           a sweep file (slurm/sweep.sbatch): this job (an array task) trains run
#                   $SLURM_ARRAY_TASK_ID of it with `mnistdist sweep SWEEP --run INDEX`, which
#                   sets the config, overrides and run directory (CONFIG and RUN_DIR are unused;
#                   OVERRIDES still apply, after the sweep's)
#   SWEEP_DIR       the sweep directory (default: runs/sweeps/<sweep name>)
# elastic.sbatch only (torchrun's names; LAUNCH_ARGS are then extra torchrun arguments):
#   MIN_NODES       the job goes on while at least this many nodes are left (default: 1)
#   MAX_RESTARTS    new generations of workers each node's agent may start after a failure,
#                   a lost node's included (torchrun --max-restarts; default: 3)
#   RDZV_JOIN_TIMEOUT            seconds a rendezvous may take before the job gives up (default: 600)
#   RDZV_LAST_CALL_TIMEOUT       seconds a round with MIN_NODES..NODES-1 nodes waits for more (default: 5)
#   RDZV_KEEP_ALIVE_INTERVAL     seconds between an agent's keep-alives (default: 1)
#   RDZV_KEEP_ALIVE_MAX_ATTEMPT  keep-alives missed before a node counts as lost (default: 3)
#   MASTER_ADDR must be an address of the job's first node: its task hosts the rendezvous store.
#
# The numeric knobs (NODES, GPUS_PER_NODE, PROCS_PER_NODE, THREADS_PER_PROC, MASTER_PORT,
# MAX_REQUEUES, MIN_NODES, MAX_RESTARTS, RDZV_*) and the Slurm variables computed with
# (SLURM_JOB_ID, SLURM_JOB_NUM_NODES, SLURM_CPUS_PER_TASK, SLURM_RESTART_COUNT,
# SLURM_GPUS_ON_NODE, SLURM_ARRAY_TASK_ID) must be plain decimal integers; REPO, PYTHON, CONFIG,
# RESUME and LAUNCH_CONFIG (not used by elastic.sbatch) must exist; DEVICE is gpu, cpu or auto;
# SLURM_JOB_ID must be set, and SLURM_JOB_NODELIST unless MASTER_ADDR is. Anything else stops
# the job before the training step, with one line naming the variable and exit 2. (Bash
# arithmetic evaluates a variable's value as an expression, and `x[$(cmd)]` in it runs cmd: so
# the templates compute nothing themselves, and ms_configure checks each number before its
# first use.)

MNISTDIST_EXIT_PREEMPTED=75  # mnistdist/signals.py EXIT_PREEMPTED: stopped, checkpoint written
# Set to 1 by elastic.sbatch after sourcing this file; never taken from the environment.
MS_ELASTIC=0

ms_log() { echo "[mnistdist-slurm $(date +%H:%M:%S)] $*"; }
# One line whatever the message holds: a knob's value may contain newlines or escapes.
ms_die() { local line="error: $*"; ms_log "${line//[![:print:]]/?}" >&2; exit 2; }

# ms_check_number NAME MIN [MAX]: the variable NAME must hold a plain decimal integer (digits
# only, no sign, no leading zero: bash reads 08 as bad octal) in MIN..MAX, else the job stops
# with one line and exit 2. Checked as a string first, so nothing in it is ever evaluated.
ms_check_number() {
    local name=$1 min=$2 max=${3:-} value=${!1-}
    if [[ -z $value || $value == *[!0123456789]* || $value == 0?* || ${#value} -gt 18 ]]; then
        ms_die "$name='$value': must be a plain non-negative integer (digits only)"
    fi
    if [[ -n $max ]] && (( value < min || value > max )); then
        ms_die "$name=$value: must be in $min..$max"
    fi
    (( value >= min )) || ms_die "$name=$value: must be >= $min"
}

# ms_count_gpus: sets MS_GPUS to the number of GPUs of this node: $SLURM_GPUS_ON_NODE (checked
# here, its only reader, before anyone computes with it), else the GPUs `nvidia-smi -L` lists,
# else 0. It sets a variable rather than printing: run inside $(...), a failed check would end
# only that subshell, and the caller would go on with whatever it printed.
ms_count_gpus() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        ms_check_number SLURM_GPUS_ON_NODE 0
        MS_GPUS=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        MS_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)  # grep -c prints 0 and fails on none
    else
        MS_GPUS=0
    fi
}

# Reads and checks every knob. Invariant: each variable is checked (ms_check_number, or a
# string test) before it is used in arithmetic, a path or a command line, and everything is
# checked before anything runs (the sweep file, read by Python, comes last).
ms_configure() {
    [[ -n ${SLURM_JOB_ID:-} ]] || ms_die "SLURM_JOB_ID is not set: not inside a Slurm job (submit this with sbatch)"
    ms_check_number SLURM_JOB_ID 0
    if [[ -n ${SLURM_JOB_NUM_NODES:-} ]]; then ms_check_number SLURM_JOB_NUM_NODES 1; fi
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then ms_check_number SLURM_CPUS_PER_TASK 1; fi
    if [[ -n ${SLURM_RESTART_COUNT:-} ]]; then ms_check_number SLURM_RESTART_COUNT 0; fi
    REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$REPO" 2>/dev/null || ms_die "REPO=$REPO: no such directory"
    [[ -f train_dist.py ]] || ms_die "REPO=$REPO is not an mnistdist checkout (no train_dist.py)"
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    command -v -- "$PYTHON" >/dev/null || ms_die "PYTHON=$PYTHON: no such command"
    NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
    ms_check_number NODES 1
    if [[ $NODES != "${SLURM_JOB_NUM_NODES:-1}" ]]; then
        ms_die "NODES=$NODES but the job has ${SLURM_JOB_NUM_NODES:-1} node(s): submit with sbatch --nodes=$NODES"
    fi
    DEVICE=${DEVICE:-gpu}
    if [[ $DEVICE == auto ]]; then
        ms_count_gpus
        if (( MS_GPUS > 0 )); then DEVICE=gpu; else DEVICE=cpu; fi
    fi
    case $DEVICE in
        gpu)
            if [[ -z ${GPUS_PER_NODE:-} ]]; then
                ms_count_gpus
                GPUS_PER_NODE=$MS_GPUS
            fi
            ms_check_number GPUS_PER_NODE 0
            (( GPUS_PER_NODE > 0 )) || ms_die "DEVICE=gpu but no GPUs found on $(hostname -s) (request them with --gpus-per-node, or use DEVICE=cpu / slurm/cpu.sbatch)"
            PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
            ;;
        cpu)
            PROCS_PER_NODE=${PROCS_PER_NODE:-1}
            ;;
        *) ms_die "DEVICE=$DEVICE: must be gpu, cpu or auto" ;;
    esac
    ms_check_number PROCS_PER_NODE 1
    local cpus=${SLURM_CPUS_PER_TASK:-1}
    THREADS_PER_PROC=${THREADS_PER_PROC:-$(( cpus / PROCS_PER_NODE > 1 ? cpus / PROCS_PER_NODE : 1 ))}
    ms_check_number THREADS_PER_PROC 1
    NUM_PROCESSES=$(( NODES * PROCS_PER_NODE ))
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    ms_check_number MASTER_PORT 1 65535
    MAX_REQUEUES=${MAX_REQUEUES:-20}
    ms_check_number MAX_REQUEUES 0
    if (( MS_ELASTIC )); then
        MIN_NODES=${MIN_NODES:-1}
        ms_check_number MIN_NODES 1 "$NODES"
        MAX_RESTARTS=${MAX_RESTARTS:-3}
        ms_check_number MAX_RESTARTS 0 1000
        RDZV_JOIN_TIMEOUT=${RDZV_JOIN_TIMEOUT:-600}
        ms_check_number RDZV_JOIN_TIMEOUT 1 86400
        RDZV_LAST_CALL_TIMEOUT=${RDZV_LAST_CALL_TIMEOUT:-5}
        ms_check_number RDZV_LAST_CALL_TIMEOUT 1 86400
        RDZV_KEEP_ALIVE_INTERVAL=${RDZV_KEEP_ALIVE_INTERVAL:-1}
        ms_check_number RDZV_KEEP_ALIVE_INTERVAL 1 86400
        RDZV_KEEP_ALIVE_MAX_ATTEMPT=${RDZV_KEEP_ALIVE_MAX_ATTEMPT:-3}
        ms_check_number RDZV_KEEP_ALIVE_MAX_ATTEMPT 1 1000
    fi
    CONFIG=${CONFIG:-configs/default.yaml}
    OVERRIDES=${OVERRIDES:-}
    RESUME=${RESUME:-auto}
    LAUNCH_CONFIG=${LAUNCH_CONFIG:-configs/accelerate/cpu.yaml}
    LAUNCH_ARGS=${LAUNCH_ARGS:-}
    SWEEP=${SWEEP:-}
    SWEEP_DIR=${SWEEP_DIR:-}
    [[ -n $SWEEP || -f $CONFIG ]] || ms_die "CONFIG=$CONFIG: no such file (relative paths are relative to REPO=$REPO)"
    case $RESUME in
        auto | never) ;;
        *) [[ -e $RESUME ]] || ms_die "RESUME=$RESUME: must be auto, never or an existing checkpoint directory" ;;
    esac
    if (( NUM_PROCESSES > 1 && ! MS_ELASTIC )) && [[ ! -f $LAUNCH_CONFIG ]]; then
        ms_die "LAUNCH_CONFIG=$LAUNCH_CONFIG: no such file (relative paths are relative to REPO=$REPO)"
    fi
    MS_SWEEP=()
    if [[ -n $SWEEP ]]; then
        [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || ms_die "SWEEP=$SWEEP but this is not an array job: submit with sbatch --array=0-N (mnistdist sweep $SWEEP --list says N)"
        ms_check_number SLURM_ARRAY_TASK_ID 0
        MS_SWEEP=(sweep "$SWEEP")
        if [[ -n $SWEEP_DIR ]]; then MS_SWEEP+=(--out "$SWEEP_DIR"); fi
        # This also checks the sweep file and the run's directory: a bad file, or a run directory
        # that holds a run of other settings (stale; with the OVERRIDES the step gets), stops the
        # task with its one line.
        local err
        local -a sweep_overrides=()
        read -r -d '' -a sweep_overrides <<<"$OVERRIDES" || true
        err=$(mktemp)
        if ! RUN_DIR=$("$PYTHON" -m mnistdist.cli "${MS_SWEEP[@]}" --print-run-dir "$SLURM_ARRAY_TASK_ID" \
                "${sweep_overrides[@]}" 2>"$err"); then
            local why
            why=$(tail -n 1 "$err")
            rm -f "$err"
            ms_die "SWEEP=$SWEEP: ${why#error: }"
        fi
        rm -f "$err"
        if [[ -f $RUN_DIR/summary.json ]]; then  # (`sweep --run` would say the same, after starting a launcher)
            ms_log "sweep $SWEEP: run $SLURM_ARRAY_TASK_ID (${RUN_DIR##*/}) finished before ($RUN_DIR/summary.json); skipped"
            exit 0
        fi
    fi
    RUN_DIR=${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}
    RUN_DIR=$(realpath -m -- "$RUN_DIR")
    if [[ -z ${MASTER_ADDR:-} ]]; then
        [[ -n ${SLURM_JOB_NODELIST:-} ]] || ms_die "SLURM_JOB_NODELIST is not set: no first node to host the rendezvous (set MASTER_ADDR)"
        # The first node of the job (= `scontrol show hostnames ... | head -n1`, but sed reads all
        # of its input: with pipefail, head could make scontrol die of SIGPIPE).
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
        [[ -n $MASTER_ADDR ]] || ms_die "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST: scontrol show hostnames gave no host (set MASTER_ADDR)"
    fi
}

# The srun step: one task per node; each task execs the launcher with its own machine rank
# (elastic.sbatch: torchrun's agent, ranks from the rendezvous).
ms_build_command() {
    local -a overrides=() launch=()
    # Split at any whitespace, newlines included (without -d '' read stops at the first newline
    # and the rest would be dropped); read returns 1 at the end of its input, hence || true.
    read -r -d '' -a overrides <<<"$OVERRIDES" || true
    MS_LAUNCH_ARGS=()
    read -r -d '' -a MS_LAUNCH_ARGS <<<"$LAUNCH_ARGS" || true
    if [[ $DEVICE == cpu ]]; then overrides=(dist.device=cpu "${overrides[@]}"); fi
    if [[ -n $SWEEP ]]; then
        MS_PROGRAM=(-m mnistdist.cli "${MS_SWEEP[@]}" --run "$SLURM_ARRAY_TASK_ID" "${overrides[@]}")
    else
        MS_PROGRAM=(train_dist.py --config "$CONFIG" --run-dir "$RUN_DIR" --resume "$RESUME" "${overrides[@]}")
    fi
    # srun does not take the job's --cpus-per-task (since Slurm 22.05 it no longer reads
    # SLURM_CPUS_PER_TASK): without it the step gets one CPU per task, and a task bound to
    # it would run the THREADS_PER_PROC threads computed above on that one CPU.
    MS_CPUS=()
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then MS_CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if (( MS_ELASTIC )); then
        ms_build_elastic_command
        return
    fi
    if (( NUM_PROCESSES == 1 )); then
        # One process in all: accelerate refuses --multi_gpu (and a MULTI_GPU config file) for
        # a single process, and there is no rendezvous to hold; its simple launcher runs it.
        launch=(--num_machines 1 --num_processes 1)
    else
        launch=(
            --config_file "$LAUNCH_CONFIG" --multi_gpu
            --num_machines "$NODES" --num_processes "$NUM_PROCESSES"
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
            --rdzv_backend static --same_network
        )
    fi
    launch+=(
        --num_cpu_threads_per_process "$THREADS_PER_PROC"
        --mixed_precision no --dynamo_backend no
        "${MS_LAUNCH_ARGS[@]}"
    )
    # --kill-on-bad-exit=0: a node whose workers exit 75 first must not get its peers killed
    # before they have exited 75 themselves (a real crash still ends the group: the other
    # ranks' collectives fail or time out after dist.timeout_s).
    # The single quotes matter: $SLURM_NODEID must be expanded by each task on its own node.
    # shellcheck disable=SC2016  # (so shellcheck's "expressions don't expand" is intended)
    MS_COMMAND=(
        srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 "${MS_CPUS[@]}" --kill-on-bad-exit=0
        bash -c 'echo "[mnistdist-slurm] task on ${SLURMD_NODENAME:-$(hostname -s)}: machine rank $SLURM_NODEID"
                 exec "$0" -m mnistdist.launch --machine_rank "$SLURM_NODEID" "$@"'
        "$PYTHON" "${launch[@]}" "${MS_PROGRAM[@]}"
    )
}

# elastic.sbatch: one torchrun agent per node (the wrapper's `torchrun ARGS` form), MIN_NODES to
# NODES nodes joined by torchrun's c10d rendezvous, which the first node's task hosts.
# Invariants: the step is started with --no-kill, so Slurm neither ends the step nor the
# allocation when a node fails (the job also asks for it with #SBATCH --no-kill); the agents
# that are left re-form the job. Exactly one task hosts the store (is_host, decided on each
# node from its own SLURM_NODEID): torch's own guess compares host names and addresses, which
# can match on more than one task (nodes that share a machine) or on none. Ranks and world
# size come from the rendezvous, so no machine rank is passed. The job's threads per process
# reach torch through OMP_NUM_THREADS, which torchrun keeps when it is set.
ms_build_elastic_command() {
    local rdzv_conf="join_timeout=$RDZV_JOIN_TIMEOUT,last_call_timeout=$RDZV_LAST_CALL_TIMEOUT"
    rdzv_conf+=",keep_alive_interval=$RDZV_KEEP_ALIVE_INTERVAL,keep_alive_max_attempt=$RDZV_KEEP_ALIVE_MAX_ATTEMPT"
    local -a torchrun=(
        --nnodes "$MIN_NODES:$NODES" --nproc-per-node "$PROCS_PER_NODE" --max-restarts "$MAX_RESTARTS"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
        "${MS_LAUNCH_ARGS[@]}"
    )
    # $1 of the task is the rendezvous configuration; the task adds its own is_host to it.
    # --kill-on-bad-exit=0 as well: a lost node's task exits "badly", and a site's
    # KillOnBadExit=1 must not end the tasks that are left.
    # shellcheck disable=SC2016  # single quotes: expanded by each task on its own node
    MS_COMMAND=(
        srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 "${MS_CPUS[@]}" --no-kill --kill-on-bad-exit=0
        "--export=ALL,OMP_NUM_THREADS=$THREADS_PER_PROC"
        bash -c 'host=false
                 if [[ $SLURM_NODEID == 0 ]]; then host=true; fi
                 echo "[mnistdist-slurm] task on ${SLURMD_NODENAME:-$(hostname -s)}: node $SLURM_NODEID, rendezvous store host: $host"
                 exec "$0" -m mnistdist.launch torchrun --rdzv-conf "$1,is_host=$host" "${@:2}"'
        "$PYTHON" "$rdzv_conf" "${torchrun[@]}" "${MS_PROGRAM[@]}"
    )
}

MS_STOP_SIGNAL=""
MS_STEP_PID=""
MS_INTERRUPTED=0
MS_REQUEUEING=0

ms_on_usr1() {
    MS_INTERRUPTED=1
    MS_STOP_SIGNAL=USR1
    ms_log "SIGUSR1 (time limit near, or a stop request): passing it to the training step; each rank finishes its step, a checkpoint is written, then the job requeues"
    # Every step of this job but not this batch shell. With proctrack/linuxproc or
    # proctrack/cgroup every process of the step gets it: the launcher (which also forwards
    # it to its workers) and the workers themselves.
    # Retried while the step runs: right after the job starts Slurm may not know the step yet.
    # Before the step is started, main does this once the step is started.
    [[ -n $MS_STEP_PID ]] || return 0
    local try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        scancel --signal=USR1 "$SLURM_JOB_ID" && return 0
        [[ -n $MS_STEP_PID ]] && kill -0 "$MS_STEP_PID" 2>/dev/null || return 0
        ms_log "warning: scancel --signal=USR1 $SLURM_JOB_ID failed (try $try); retrying"
        sleep 2
    done
}

ms_on_term() {
    MS_INTERRUPTED=1
    (( MS_REQUEUEING )) && return 0
    MS_STOP_SIGNAL=TERM
    # Slurm sends SIGTERM to the whole job (the training step too, and torchrun passes it to
    # the workers) when the job is cancelled, hits its time limit, or is preempted. The
    # workers checkpoint; Slurm decides what happens to the job, so no requeue from here.
    ms_log "SIGTERM: Slurm is ending this job (scancel, time limit or preemption); waiting for the training step to checkpoint and exit"
}

# Wait for PID, also across trapped signals (a trap makes `wait` return early).
ms_wait() {
    local pid=$1 rc again
    while :; do
        MS_INTERRUPTED=0
        rc=0
        wait "$pid" || rc=$?
        (( MS_INTERRUPTED )) || break
        if kill -0 "$pid" 2>/dev/null; then continue; fi  # still running (or not yet reaped)
        again=0
        wait "$pid" 2>/dev/null || again=$?
        (( again == 127 )) || rc=$again  # 127: the status was already collected above
        break
    done
    return "$rc"
}

# Did this run write RUN_DIR/summary.json (the last file a finished training writes)?
ms_finished_since() {
    local summary=$RUN_DIR/summary.json
    [[ -f $summary ]] && (( $(stat -c %Y "$summary") >= $1 ))
}

ms_newest_checkpoint() {
    local dirs=("$RUN_DIR"/checkpoints/step-*/manifest.json)
    [[ -f ${dirs[-1]} ]] && dirname "${dirs[-1]}"  # step-XXXXXXXX sorts by step
}

# Did this run commit a checkpoint (manifest.json is the last file of one)?
ms_checkpointed_since() {
    local newest
    newest=$(ms_newest_checkpoint) || return 1
    (( $(stat -c %Y "$newest/manifest.json") >= $1 ))
}

ms_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= MAX_REQUEUES )); then
        ms_log "not requeueing: the job has restarted $restarts times (MAX_REQUEUES=$MAX_REQUEUES); resume it with the same RUN_DIR=$RUN_DIR"
        exit "$MNISTDIST_EXIT_PREEMPTED"
    fi
    ms_log "requeueing job $SLURM_JOB_ID (restart $(( restarts + 1 ))); it resumes from the newest checkpoint in $RUN_DIR"
    MS_REQUEUEING=1
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        ms_log "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR to continue"
    fi
    exit "$MNISTDIST_EXIT_PREEMPTED"
}

mnistdist_slurm_main() {
    ms_configure
    ms_build_command
    if [[ -n $SWEEP ]]; then ms_log "array task ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID: run $SLURM_ARRAY_TASK_ID of $SWEEP"; fi
    local shape="$NODES node(s)"
    if (( MS_ELASTIC )); then shape="elastic, $MIN_NODES..$NODES node(s)"; fi
    ms_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $shape x $PROCS_PER_NODE process(es), DEVICE=$DEVICE, head $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
    ms_log "running: $(printf '%q ' "${MS_COMMAND[@]}")"
    trap ms_on_usr1 USR1
    trap ms_on_term TERM
    local started
    started=$(date +%s)
    "${MS_COMMAND[@]}" &
    MS_STEP_PID=$!
    [[ $MS_STOP_SIGNAL != USR1 ]] || ms_on_usr1  # USR1 came before the step existed
    local rc=0
    ms_wait "$MS_STEP_PID" || rc=$?
    if (( rc == 0 )); then
        ms_log "training finished: $RUN_DIR/model.safetensors"
        exit 0
    fi
    if [[ -n $MS_STOP_SIGNAL ]] && ms_finished_since "$started"; then
        # The signal came while the finished run was shutting down (a launcher that is
        # already exiting no longer handles USR1).
        ms_log "training finished (the step exited $rc on SIG$MS_STOP_SIGNAL after writing $RUN_DIR/summary.json)"
        exit 0
    fi
    if (( MS_ELASTIC )) && ms_finished_since "$started"; then
        # srun exits with the worst of its tasks' codes: a node lost on the way (its task
        # killed or failed) makes it non-zero although the nodes left finished the training.
        ms_log "training finished: $RUN_DIR/model.safetensors (the step exited $rc: a node's task ended early and the job went on without it; see above)"
        exit 0
    fi
    if [[ $MS_STOP_SIGNAL == TERM ]]; then
        if ms_checkpointed_since "$started"; then
            # (The launchers get SIGTERM too and may exit 1 although their workers exited 75.)
            ms_log "stopped by SIGTERM (the step exited $rc); checkpoint written: $(ms_newest_checkpoint)"
            exit "$MNISTDIST_EXIT_PREEMPTED"
        fi
        ms_log "training step exited $rc after SIGTERM; no new checkpoint in $RUN_DIR/checkpoints"
        exit "$rc"
    fi
    if (( rc == MNISTDIST_EXIT_PREEMPTED )); then
        ms_requeue
    fi
    if [[ $MS_STOP_SIGNAL == USR1 ]]; then
        # E.g. the signal came while the workers were still starting (before they handle
        # USR1): no new checkpoint, but the newest valid one is still the place to resume.
        ms_log "warning: training step exited $rc (not $MNISTDIST_EXIT_PREEMPTED) after SIGUSR1; requeueing anyway"
        ms_requeue
    fi
    ms_log "training failed: the step exited $rc"
    exit "$rc"
}
