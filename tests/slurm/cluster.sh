#!/usr/bin/env bash
# A one-machine Slurm cluster to try `sbatch slurm.sh` on: munged, slurmctld and two slurmd
# "nodes" (mamba-node1, mamba-node2) on 127.0.0.1, each slurmd with its own private /dev/shm
# (as on separate machines), everything else shared (/tmp plays the cluster file system).
#
#   tests/slurm/cluster.sh start     # idempotent; a few seconds; prints the line below
#   export SLURM_CONF=/tmp/mamba-slurm/slurm.conf
#   sbatch --nodes 2 slurm.sh yamls/tiny.yaml ; squeue ; scontrol show job N
#   tests/slurm/cluster.sh status
#   tests/slurm/cluster.sh stop      # cancels its jobs, stops only the daemons it started
#
# Needs root (slurmd runs jobs as any user; it mounts the private /dev/shm) and Debian's
# `apt-get install slurm-wlm munge`. Knobs: CLUSTER_DIR (state, logs, pid files; default
# /tmp/mamba-slurm) and CLUSTER_PORT (the controller's port; nodes use the next two).
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin  # the daemons, for a non-login shell
RUN=${CLUSTER_DIR:-/tmp/mamba-slurm}
PORT=${CLUSTER_PORT:-16817}
NODES=(mamba-node1 mamba-node2)
HOSTS_TAG="# mamba-recipe tests/slurm/cluster.sh"
TEMPLATE="$(cd "$(dirname "$0")" && pwd)/slurm.conf.in"
export SLURM_CONF=$RUN/slurm.conf

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: $*" >&2; exit 2; }

# the pid in FILE if that process is alive and is the program NAME (not a recycled pid)
live_pid() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc 0-9 < "$file")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

all_running() {
  live_pid "$RUN/munge/munged.pid" munged > /dev/null \
    && live_pid "$RUN/slurmctld.pid" slurmctld > /dev/null \
    && live_pid "$RUN/${NODES[0]}/slurmd.pid" slurmd > /dev/null \
    && live_pid "$RUN/${NODES[1]}/slurmd.pid" slurmd > /dev/null
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
  [ "$(grep -cE ' (idle|mixed|allocated)$' <<< "$states")" -eq ${#NODES[@]} ]
}

# names that resolve, as on a cluster: MASTER_ADDR is the first node's name
add_hosts() {
  local missing=()
  for n in "${NODES[@]}"; do getent hosts "$n" > /dev/null || missing+=("$n"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "127.0.0.1 ${missing[*]}  $HOSTS_TAG" >> /etc/hosts
}

remove_hosts() {
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  local kept
  kept=$(grep -vF "$HOSTS_TAG" /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts  # in place: /etc/hosts is often a bind mount
}

start() {
  [ "$(id -u)" -eq 0 ] || die "start needs root (slurmd runs jobs and mounts a private /dev/shm per node)"
  for b in munged slurmctld slurmd sbatch unshare; do
    command -v "$b" > /dev/null || die "no $b: apt-get install -y slurm-wlm munge"
  done
  if all_running && nodes_idle; then
    say "already running ($RUN)"
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  stop quiet  # whatever is left of an earlier start
  mkdir -p "$RUN/munge" "$RUN/ctld"
  chmod 700 "$RUN/munge"
  [ -s "$RUN/munge/munge.key" ] || dd if=/dev/urandom of="$RUN/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$RUN/munge/munge.key"
  sed -e "s|@RUN@|$RUN|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$PORT|g" \
      -e "s|@NODE1@|${NODES[0]}|g" -e "s|@NODE2@|${NODES[1]}|g" \
      -e "s|@NODE1_PORT@|$((PORT + 1))|g" -e "s|@NODE2_PORT@|$((PORT + 2))|g" \
      -e "s|@CPUS@|$(nproc --all)|g" "$TEMPLATE" > "$SLURM_CONF"
  add_hosts
  munged --force --key-file="$RUN/munge/munge.key" --socket="$RUN/munge/munge.socket" \
    --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" --seed-file="$RUN/munge/seed" \
    || die "munged did not start: see $RUN/munge/munged.log"
  slurmctld -f "$SLURM_CONF" || die "slurmctld did not start: see $RUN/slurmctld.log"
  for n in "${NODES[@]}"; do
    mkdir -p "$RUN/$n/spool"
    # its own /dev/shm, as a separate machine has: shared-memory names never meet across nodes
    unshare -m sh -c 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -f "$1" -N "$2"' \
      sh "$SLURM_CONF" "$n" || die "slurmd -N $n did not start: see $RUN/$n/slurmd.log"
  done
  for _ in $(seq 100); do
    nodes_idle && break
    sleep 0.3
  done
  nodes_idle || die "nodes not up after 30 s: $(sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')(logs in $RUN)"
  say "started: nodes ${NODES[*]} on 127.0.0.1, logs and state in $RUN"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local pid quiet=${1:-}
  if live_pid "$RUN/slurmctld.pid" slurmctld > /dev/null; then
    scancel --quiet --full --user="$(id -un)" 2> /dev/null || true
    for _ in $(seq 50); do  # let the nodes end the jobs' processes
      [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2> /dev/null)" ] && break
      sleep 0.2
    done
  fi
  # all four told at once (each takes 1-2 s to exit), then waited for; -9 after 5 s
  local pids=()
  for f in "$RUN/${NODES[0]}/slurmd.pid:slurmd" "$RUN/${NODES[1]}/slurmd.pid:slurmd" \
           "$RUN/slurmctld.pid:slurmctld" "$RUN/munge/munged.pid:munged"; do
    pid=$(live_pid "${f%:*}" "${f##*:}") || continue
    kill "$pid" && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2> /dev/null && kill -9 "$pid"
  done
  rm -f "$RUN/${NODES[0]}/slurmd.pid" "$RUN/${NODES[1]}/slurmd.pid" "$RUN/slurmctld.pid" \
        "$RUN/munge/munged.pid"
  [ "$(id -u)" -ne 0 ] || remove_hosts
  [ -n "$quiet" ] || say "stopped"
}

status() {
  local ok=0
  for f in "$RUN/munge/munged.pid:munged" "$RUN/slurmctld.pid:slurmctld" \
           "$RUN/${NODES[0]}/slurmd.pid:slurmd" "$RUN/${NODES[1]}/slurmd.pid:slurmd"; do
    if pid=$(live_pid "${f%:*}" "${f##*:}"); then say "${f##*:} running (pid $pid)"
    else say "${f##*:} not running ($(dirname "${f%:*}"))"; ok=1; fi
  done
  [ $ok -eq 0 ] && sinfo -N
  [ $ok -eq 0 ] && echo "export SLURM_CONF=$SLURM_CONF"
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: tests/slurm/cluster.sh start|stop|status" ;;
esac
