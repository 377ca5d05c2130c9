#!/usr/bin/env bash
# A real, tiny Slurm cluster on this one machine, for tests/slurm (and for trying the
# templates in slurm/ by hand):
#
#   scripts/slurm_cluster.sh install   apt-get install slurmctld slurmd slurm-client munge (if missing)
#   scripts/slurm_cluster.sh up        start munged, slurmctld and two slurmd "nodes" (node1, node2)
#   scripts/slurm_cluster.sh status    sinfo + squeue
#   scripts/slurm_cluster.sh down      cancel all jobs, stop slurmd, slurmctld and munged
#
# `up` is idempotent (whatever already runs is kept) and waits until both nodes are idle;
# `down` is safe to call at any time. Needs root. Each node has CPUs=2 (this machine's two
# cores, seen by both "nodes": two processes of one job on two nodes share them, talking over
# 127.0.0.1) and RealMemory=8192 (MB; not enforced, but a job may ask for no more).
#
# Files: /etc/slurm/slurm.conf (written by `up`; a slurm.conf not written by this script is
# never overwritten), /etc/hosts gets "127.0.0.1 node1 node2", state and logs live in
# $MNISTDIST_SLURM_DIR (default /var/tmp/mnistdist-slurm): slurmctld.log, slurmd-node1.log, ...
#
# Timing settings chosen for tests (see the comments in the generated slurm.conf): finished
# jobs stay visible to `scontrol show job` for an hour (MinJobAge; there is no accounting
# database, so sacct does not work here), and KillWait=30 s between SIGTERM and SIGKILL.
set -euo pipefail

STATE_DIR=${MNISTDIST_SLURM_DIR:-/var/tmp/mnistdist-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mnistdist scripts/slurm_cluster.sh"
NODES=(node1 node2)
NODE_PORTS=(17001 17002)
CTLD_PORT=${MNISTDIST_SLURMCTLD_PORT:-6817}
PACKAGES=(slurmctld slurmd slurm-client munge)
CONF_CHANGED=0

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (it starts daemons and edits /etc)"; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
               command -v sbatch >/dev/null && command -v munged >/dev/null; }

cmd_install() {
    need_root
    if have_slurm; then return 0; fi
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is unavailable"
    log "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
    have_slurm || die "apt-get install finished but slurm binaries are missing"
}

# pid from a pid file, if that process is alive and is the named program
live_pid() {  # FILE NAME
    local pid
    [[ -r $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

stop_daemons() {  # NAME:PIDFILE...: SIGTERM to all at once, wait up to 15 s, then SIGKILL
    local spec name file pid i alive
    local -a pids=() files=()
    for spec in "$@"; do
        name=${spec%%:*}
        file=${spec#*:}
        files+=("$file")
        if pid=$(live_pid "$file" "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 150; i++)); do
        alive=0
        for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if [[ -d /proc/$pid ]]; then
            log "$(cat "/proc/$pid/comm" 2>/dev/null) ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "${files[@]}"
}

write_hosts() {
    local name
    [[ -z $(tail -c1 /etc/hosts) ]] || echo >>/etc/hosts  # end the last line first
    for name in "${NODES[@]}"; do
        if ! grep -Eq "^[^#]*[[:space:]]$name([[:space:]]|\$)" /etc/hosts; then
            echo "127.0.0.1 $name    $MARKER" >>/etc/hosts
        fi
    done
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/spool"
    local host i tmp
    host=$(hostname -s)
    tmp=$(mktemp "$CONF.XXXXXX")
    {
        echo "$MARKER: a two-node test cluster on one machine"
        echo "ClusterName=mnistdist"
        echo "SlurmctldHost=$host"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "# A requeued job waits cred_expire+1 seconds before it may start again (default 120)."
        echo "AuthInfo=cred_expire=10"
        echo "ProctrackType=proctrack/linuxproc"
        echo "# Tasks are bound to the CPUs of their step only when a job asks (srun --cpu-bind, or"
        echo "# SLURM_CPU_BIND): both nodes' CPUs 0-1 are the same two cores, so binding every task"
        echo "# by default would put a 1-CPU task of each node on the same core."
        echo "TaskPlugin=task/affinity"
        echo "TaskPluginParam=None"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "MailProg=/bin/true"
        echo "SchedulerType=sched/backfill"
        echo "# Look at pending jobs every 2 s (default 60 s / 30 s), so a requeued job restarts quickly."
        echo "SchedulerParameters=sched_interval=2,bf_interval=2"
        echo "StateSaveLocation=$STATE_DIR/ctld"
        echo "SlurmctldPidFile=$STATE_DIR/slurmctld.pid"
        echo "SlurmctldLogFile=$STATE_DIR/slurmctld.log"
        echo "SlurmdSpoolDir=$STATE_DIR/spool/%n"
        echo "SlurmdPidFile=$STATE_DIR/slurmd-%n.pid"
        echo "SlurmdLogFile=$STATE_DIR/slurmd-%n.log"
        echo "ReturnToService=2"
        echo "# Finished jobs stay in slurmctld's memory (scontrol show job) this many seconds."
        echo "MinJobAge=3600"
        echo "# Seconds between SIGTERM and SIGKILL when a job hits its time limit or is cancelled."
        echo "KillWait=30"
        echo "# Minutes a job may run past its time limit before it is killed (0: none)."
        echo "OverTimeLimit=0"
        echo "# Seconds a node may take to report a finished job before it is drained."
        echo "UnkillableStepTimeout=120"
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=2 RealMemory=8192 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$tmp"
    chmod 644 "$tmp"
    if cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    mv "$tmp" "$CONF"
    CONF_CHANGED=1
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
            chown munge:munge /etc/munge/munge.key
            chmod 400 /etc/munge/munge.key
        fi
    fi
    runuser -u munge -- /usr/sbin/munged --force
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

cmd_up() {
    need_root
    have_slurm || die "slurm is not installed (scripts/slurm_cluster.sh install, or apt-get install ${PACKAGES[*]})"
    write_hosts
    write_conf
    start_munge
    if ! live_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
        log "starting slurmctld"
        slurmctld -c -i   # -c: start with an empty queue (no jobs from an earlier session)
    elif (( CONF_CHANGED )); then
        log "slurm.conf changed: scontrol reconfigure"
        scontrol reconfigure || true
    fi
    local i node
    for ((i = 0; i < 100; i++)); do ctld_up && break; sleep 0.2; done
    ctld_up || die "slurmctld does not answer (see $STATE_DIR/slurmctld.log)"
    for node in "${NODES[@]}"; do
        if ! live_pid "$STATE_DIR/slurmd-$node.pid" slurmd >/dev/null; then
            log "starting slurmd -N $node"
            mkdir -p "$STATE_DIR/spool/$node"
            slurmd -N "$node"
        fi
    done
    local states
    for ((i = 0; i < 150; i++)); do
        states=$(node_states)
        if [[ $(grep -cE ' (idle|mix|alloc)$' <<<"$states") == "${#NODES[@]}" ]]; then
            log "cluster up: $(tr '\n' ' ' <<<"$states")"
            return 0
        fi
        if grep -qE ' (down|drain|drng|fail)[*~#!%$@^-]*$' <<<"$states"; then
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
        fi
        sleep 0.2
    done
    die "nodes not idle after 30 s: $(tr '\n' ' ' <<<"$states") (see $STATE_DIR/*.log)"
}

cmd_down() {
    need_root
    local i node
    if have_slurm && ctld_up; then
        scancel --quiet --full --signal=KILL --user=root 2>/dev/null || true
        scancel --quiet --user=root 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(squeue -h -t R,CG,S 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    local -a daemons=("slurmctld:$STATE_DIR/slurmctld.pid")
    for node in "${NODES[@]}"; do daemons+=("slurmd:$STATE_DIR/slurmd-$node.pid"); done
    stop_daemons "${daemons[@]}"
    stop_daemons munged:/run/munge/munged.pid  # last: slurmd and slurmctld use it until they exit
    log "cluster down"
}

cmd_status() {
    sinfo -N || true
    squeue || true
}

case ${1:-} in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
