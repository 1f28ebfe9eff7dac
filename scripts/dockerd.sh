#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine; start one if none does.
#
#   scripts/dockerd.sh         idempotent: does nothing when `docker info` already works
#
# Otherwise, as root (re-run through `sudo -n` when that works without a password):
#   - with systemd running, `systemctl start docker`;
#   - else `dockerd` in the background, in its own session, logging to
#     $MESH_DOCKERD_LOG (default /var/log/mesh-dockerd.log) with its pid in
#     $MESH_DOCKERD_PIDFILE (default /run/mesh-dockerd.pid);
# then waits until `docker info` answers, at most $MESH_DOCKERD_TIMEOUT seconds (60).
#
# Extra daemon flags: MESH_DOCKERD_FLAGS="--data-root /srv/docker" scripts/dockerd.sh
#
# Firewall: on the machines mesh is developed on (Debian bookworm, iptables 1.8.9
# with the nf_tables backend) dockerd starts with its default iptables rules, no
# tweak needed. Where the kernel refuses iptables (some sandboxes and nested
# containers), dockerd exits at start-up; this script then tries once more with
# `--iptables=false --ip6tables=false` and says so: containers still start,
# internal networks and ports published on 127.0.0.1 (through docker-proxy)
# still work, but containers get no NAT to the outside.
#
# Stop what this script started:  kill "$(cat /run/mesh-dockerd.pid)"
set -euo pipefail

timeout=${MESH_DOCKERD_TIMEOUT:-60}
log=${MESH_DOCKERD_LOG:-/var/log/mesh-dockerd.log}
pidfile=${MESH_DOCKERD_PIDFILE:-/run/mesh-dockerd.pid}
read -r -a extra_flags <<<"${MESH_DOCKERD_FLAGS:-}"

say() { echo "dockerd.sh: $*"; }
die() { echo "dockerd.sh: $*" >&2; exit 1; }

engine_answers() { docker info >/dev/null 2>&1; }

command -v docker >/dev/null 2>&1 || die "the docker command is missing (Debian: apt-get install docker.io)"

if engine_answers; then
  say "Docker engine already running (server $(docker info --format '{{.ServerVersion}}' 2>/dev/null || echo '?')); nothing to do"
  exit 0
fi

if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ] \
   && [ "${DOCKER_HOST}" != "unix:///run/docker.sock" ]; then
  die "DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local engine in its place"
fi

if [ "$(id -u)" != 0 ]; then
  if [ -S /var/run/docker.sock ] && [[ "$(docker info 2>&1 || true)" == *"permission denied"* ]]; then
    die "an engine is running but $(id -un) may not use /var/run/docker.sock: use sudo or join the 'docker' group"
  fi
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    say "not root: re-running with sudo"
    exec sudo -n --preserve-env=MESH_DOCKERD_TIMEOUT,MESH_DOCKERD_LOG,MESH_DOCKERD_PIDFILE,MESH_DOCKERD_FLAGS "$0" "$@"
  fi
  die "the Docker engine is not running and starting it needs root: sudo $0"
fi

command -v dockerd >/dev/null 2>&1 || die "dockerd is missing (Debian: apt-get install docker.io)"

wait_for_engine() {  # wait_for_engine PID|"" -> 0 when `docker info` answers, 1 if PID died, 2 on timeout
  local pid=$1 deadline=$((SECONDS + timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if engine_answers; then return 0; fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.5
  done
  if engine_answers; then return 0; fi
  return 2
}

started_at=$SECONDS

# 1. A daemon already starting (ours from an earlier call, or someone else's): wait for it.
running_pid=""
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
   && [ "$(ps -o comm= -p "$(cat "$pidfile")" 2>/dev/null)" = dockerd ]; then
  running_pid=$(cat "$pidfile")
elif [ -s /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null \
   && [ "$(ps -o comm= -p "$(cat /var/run/docker.pid)" 2>/dev/null)" = dockerd ]; then
  running_pid=$(cat /var/run/docker.pid)
fi
if [ -n "$running_pid" ]; then
  say "dockerd (pid $running_pid) is running but not answering yet; waiting up to ${timeout}s"
  if wait_for_engine "$running_pid"; then
    say "Docker engine answers after $((SECONDS - started_at))s"
    exit 0
  fi
  die "dockerd (pid $running_pid) did not answer within ${timeout}s; see $log or /var/log/docker.log"
fi

# 2. systemd: let it start its unit.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  say "starting the docker service with systemctl"
  if systemctl start docker 2>&1 && wait_for_engine ""; then
    say "Docker engine (systemd unit 'docker') answers after $((SECONDS - started_at))s"
    exit 0
  fi
  say "systemctl start docker did not give an engine; starting dockerd directly"
fi

# 3. dockerd in the background.
mkdir -p "$(dirname "$log")" 2>/dev/null || true
if ! touch "$log" 2>/dev/null; then log=/tmp/mesh-dockerd.log; fi
mkdir -p "$(dirname "$pidfile")" 2>/dev/null || true

start_dockerd() {  # start_dockerd FLAGS... -> sets $pid
  echo "=== $(date -u +%FT%TZ) dockerd $*" >>"$log"
  setsid nohup dockerd "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pidfile"
  say "started dockerd ${*:+($*) }as pid $pid (log: $log, pid file: $pidfile); waiting up to ${timeout}s"
}

start_dockerd "${extra_flags[@]}"
status=0
wait_for_engine "$pid" || status=$?
if [ "$status" = 1 ] && grep -qiE 'iptables|nf_tables|nat chain|netfilter' <(tail -n 40 "$log"); then
  say "dockerd exited over iptables (see below); retrying without iptables rules (no NAT to the outside)"
  tail -n 5 "$log" | sed 's/^/  | /'
  start_dockerd --iptables=false --ip6tables=false "${extra_flags[@]}"
  status=0
  wait_for_engine "$pid" || status=$?
fi
case $status in
  0) say "Docker engine answers after $((SECONDS - started_at))s (server $(docker info --format '{{.ServerVersion}}' 2>/dev/null || echo '?'))" ;;
  1) echo "dockerd.sh: dockerd exited; the end of $log:" >&2
     tail -n 20 "$log" | sed 's/^/  | /' >&2
     rm -f "$pidfile"
     exit 1 ;;
  *) echo "dockerd.sh: dockerd (pid $pid) did not answer within ${timeout}s; the end of $log:" >&2
     tail -n 20 "$log" | sed 's/^/  | /' >&2
     exit 1 ;;
esac
