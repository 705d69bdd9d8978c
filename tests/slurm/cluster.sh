#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh start DIR    install Slurm + munge if missing, start munged, slurmctld and
#                                       two slurmd (node1, node2); wait until both nodes are idle
#   tests/slurm/cluster.sh stop DIR     cancel the jobs, stop every daemon and job process, rm -r DIR
#
# Then `SLURM_CONF=DIR/slurm.conf sbatch ...` talks to it. Needs root (apt-get, mount namespaces).
# Ports: SLURM_TEST_PORT (default 16817) for slurmctld, the next two for node1 and node2.
#
# Why it looks like this:
# - Both slurmd are on localhost (NodeHostname=localhost, a port each) and are told their node name
#   with -N, because the machine's own hostname is neither node name.
# - Jobs need the node names to resolve (the batch script's MASTER_ADDR is the first node's name),
#   but the machine's /etc/hosts is not ours to edit. The daemons run inside `unshare --mount`, with
#   a private copy of /etc/hosts (plus "127.0.0.1 node1 node2") bind-mounted over the real one;
#   every job process they start inherits that view. `stop` finds stray processes by that same
#   mount namespace, so it ends exactly the processes this cluster started.
# - Everything (config, munge key, state, spool, logs, pid files) lives under DIR, and munge's
#   socket in a /tmp folder of its own, so the machine's own Slurm or munge, if any, is untouched.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons and mungekey live there; not every root PATH has it

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf
port=${SLURM_TEST_PORT:-16817}
# How long a job's processes get between SIGTERM and SIGKILL when it is cancelled or requeued
# (Slurm's default is 30 s): time to finish a step and save a checkpoint on a slow, busy machine.
kill_wait=${SLURM_TEST_KILL_WAIT:-60}

install_if_missing() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "installing ${missing[*]}" >&2
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

write_config() {
    mkdir -p "$dir"/{key,state,spool,log,run}
    chmod 700 "$dir/key"  # munged wants its key private...
    # ... and every folder above its socket open to all (clients must reach it), which a private
    # temporary folder is not: the socket goes in a short path of its own under /tmp.
    sock_dir=$(mktemp -d /tmp/mtgpt-munge.XXXXXX)
    chmod 755 "$sock_dir"
    ln -sfn "$sock_dir" "$dir/munge"
    mungekey --create --force --keyfile="$dir/key/munge.key"
    # The hosts file the daemons (and so the jobs) see: the machine's, plus the two node names.
    { cat /etc/hosts; echo "127.0.0.1 node1 node2"; } >"$dir/hosts"
    : >"$dir/plugstack.conf"  # no SPANK plugins (the machine's plugstack.conf is not read)
    cat >"$conf" <<EOF
ClusterName=mtgpt-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
# munge on its own socket; cred_expire also sets how long a requeued job waits before it may
# start again (default 120 s)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock_dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
# no accounting daemon, no cgroups: the plainest plugins that run anywhere
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/builtin
# look at pending jobs every 2 s (default 60): a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=$kill_wait
InactiveLimit=0
# two nodes of one CPU each, both on this machine
NodeName=node[1-2] NodeHostname=localhost Port=$((port + 1))-$((port + 2)) CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local _
    for _ in $(seq 120); do
        if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$') == 2 ]]; then
            return 0
        fi
        sleep 0.5
    done
    echo "the nodes did not come up: $(sinfo -N 2>&1)" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

start() {
    [[ $(id -u) == 0 ]] || { echo "needs root" >&2; exit 1; }
    install_if_missing
    if [[ -f $dir/run/slurmctld.pid ]] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
        echo "a cluster is already running in $dir" >&2
        exit 1
    fi
    write_config
    # The daemons fork into the background and keep the private mount namespace alive after this
    # shell exits. Their output goes to a file, not to the caller's pipes (which would stay open).
    # shellcheck disable=SC2016  # the inner bash expands $1
    unshare --mount --propagation private bash -euc '
        dir=$1
        readlink /proc/self/ns/mnt >"$dir/run/mntns"  # how `stop` recognises our processes
        mount --bind "$dir/hosts" /etc/hosts
        munged --socket="$(realpath "$dir/munge")/munge.socket" --key-file="$dir/key/munge.key" \
            --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
            --seed-file="$dir/key/munged.seed"
        slurmctld
        slurmd -N node1
        slurmd -N node2
    ' bash "$dir" </dev/null >>"$dir/log/start.log" 2>&1 || {
        cat "$dir/log/start.log" >&2
        exit 1
    }
    wait_idle
}

# Every process in the cluster's mount namespace (the daemons and whatever jobs they started),
# except the pid given as $1.
cluster_pids() {
    local ns pid
    ns=$(cat "$dir/run/mntns" 2>/dev/null) || return 0
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [[ $pid != "${1:-}" && $(readlink "/proc/$pid/ns/mnt" 2>/dev/null) == "$ns" ]] && echo "$pid"
    done
    return 0
}

# Wait up to $1 seconds for the processes listed by `cluster_pids $2` to end, then SIGKILL them.
end_within() {
    local _ pids
    for _ in $(seq $(($1 * 2))); do
        [[ -z $(cluster_pids "$2") ]] && return 0
        sleep 0.5
    done
    pids=$(cluster_pids "$2")
    # shellcheck disable=SC2086  # one pid per word
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

stop() {
    [[ -d $dir ]] || return 0
    if [[ -f $conf ]]; then
        # Cancel the jobs, then let slurmctld shut itself and both slurmd down. munged stays up
        # until they are gone: they authenticate the shutdown messages with it.
        # shellcheck disable=SC2046  # one job id per word
        scancel --quiet --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    end_within 20 "$(cat "$dir/run/munged.pid" 2>/dev/null)"  # daemons and jobs, not munged
    if [[ -f $dir/run/munged.pid ]]; then
        kill -TERM "$(cat "$dir/run/munged.pid")" 2>/dev/null || true
    fi
    end_within 10 ""
    if [[ -L $dir/munge ]]; then
        rm -rf "$(readlink "$dir/munge")"
    fi
    rm -rf "$dir"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
