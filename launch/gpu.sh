#!/usr/bin/env bash
# Run prime_jax on GPUs. Without --hosts: on this machine, one process over all its GPUs,
# from this checkout. With --hosts FILE: one process per listed host, reached by ssh, joined
# by jax.distributed through JAX_COORDINATOR_ADDRESS (first host), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID (the host's line number, from 0). See launch/README.md ("Run on GPUs").
set -euo pipefail

PROG=gpu.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOSTFILE=${PRIME_GPU_HOSTS:-}
COORDINATOR=${PRIME_GPU_COORDINATOR:-}
PORT=${PRIME_GPU_PORT:-8476}
PYTHON_BIN=${PRIME_GPU_PYTHON:-python3}
LOG_DIR=${PRIME_GPU_LOG_DIR:-$ROOT/runs/launch}
SSH=(ssh -o BatchMode=yes)
HOSTS=()
FAILED_HOSTS=()

usage() {
  cat <<EOF
Usage: launch/gpu.sh [options] COMMAND... [-- main overrides...]

Commands (run in the order given):
  up        this machine: install, preflight, run; with --hosts: deploy, install, preflight, run
  deploy    (--hosts) pack git HEAD, copy it to every host, unpack into <remote-dir>/src
  install   this machine: bubblewrap (apt), pip install -r requirements.txt '.[cuda]' into --python's
            environment; with --hosts: on every host (in parallel), bubblewrap, venv (uv) + the same pip install
  preflight python -m prime_jax.preflight (devices, workdir, model, data, verifiers, sandbox, memory);
            with --hosts on every host at once; a FAIL stops here and prints every host's FAIL lines
  run       start python -m prime_jax.main in the background (nohup); with --hosts, one
            process per host with its JAX_PROCESS_ID and --config.distributed=True
  logs      tail the newest log (with --hosts: of host --worker N)
  stop      SIGTERM main (it checkpoints and exits) and wait for it

GPU options (environment variable in brackets):
  --hosts FILE           one ssh destination per line ([user@]host; '#' starts a comment);
                         line order gives JAX_PROCESS_ID [PRIME_GPU_HOSTS]
  --coordinator HOST     address the other hosts reach process 0 at
                         [PRIME_GPU_COORDINATOR] (default: first host without 'user@')
  --port PORT            coordinator port [PRIME_GPU_PORT] (default: 8476)
  --python PATH          this machine only: Python to install into and run
                         [PRIME_GPU_PYTHON] (default: python3; use a venv's python)
  --log-dir DIR          this machine only: where logs go [PRIME_GPU_LOG_DIR] (default: runs/launch)

$(common_usage)

Examples:
  launch/gpu.sh --python .venv/bin/python up --follow
  launch/gpu.sh --hosts hosts.txt --workdir /shared/runs/qwen7b up --follow
EOF
}

read_hosts() {
  [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found"
  local line words host
  while IFS= read -r line || [ -n "$line" ]; do
    read -r -a words <<<"${line%%#*}"
    [ ${#words[@]} -gt 0 ] || continue
    [ ${#words[@]} = 1 ] || die "hostfile '$HOSTFILE': '$line' is not one ssh destination"
    for host in "${HOSTS[@]}"; do
      [ "$host" != "${words[0]}" ] || die "hostfile '$HOSTFILE' lists '$host' twice; one process per host"
    done
    HOSTS+=("${words[0]}")
  done <"$HOSTFILE"
  [ ${#HOSTS[@]} -gt 0 ] || die "hostfile '$HOSTFILE' lists no hosts"
}

on_host() {  # index script
  run "${SSH[@]}" "${HOSTS[$1]}" "$2"
}

cmd_deploy() {
  [ ${#HOSTS[@]} -gt 0 ] || die "deploy copies the code to --hosts; on this machine the checkout itself runs"
  make_tarball
  local i
  for i in "${!HOSTS[@]}"; do
    run scp -q -o BatchMode=yes "$TARBALL" "${HOSTS[$i]}:$TARBALL_NAME"
    on_host "$i" "$(unpack_script)"
  done
}

# Runs a script on every host at once (ssh in the background); fails naming the hosts where it failed.
on_hosts_in_parallel() {  # what script-function [args...]: the function prints host i's script, i first
  local what=$1 fn=$2 i pids=() failed=() script
  shift 2
  for i in "${!HOSTS[@]}"; do
    script=$("$fn" "$i" "$@")
    show "${SSH[@]}" "${HOSTS[$i]}" "$script"
    if [ "$DRY_RUN" != 1 ]; then
      "${SSH[@]}" "${HOSTS[$i]}" "$script" &
      pids+=($!)
    fi
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${HOSTS[$i]}")
  done
  FAILED_HOSTS=("${failed[@]}")
  [ ${#failed[@]} = 0 ] || note "$what failed on: ${failed[*]}"
  [ ${#failed[@]} = 0 ]
}

# The environment that makes host i process i of the run.
process_env() {  # index
  printf '%s\n' "JAX_COORDINATOR_ADDRESS=${COORDINATOR:-${HOSTS[0]#*@}}:$PORT" "JAX_NUM_PROCESSES=${#HOSTS[@]}" "JAX_PROCESS_ID=$1"
}

host_install_script() { install_script cuda; }

host_preflight_script() {  # index
  local envs
  mapfile -t envs < <(process_env "$1")
  preflight_script "$REMOTE_DIR/src" ../.venv/bin/python ../logs "$(main_args 1)" "${envs[@]}"
}

cmd_install() {
  if [ ${#HOSTS[@]} = 0 ]; then
    run sh -c "$(bwrap_install_script)"
    run "$PYTHON_BIN" -m pip install -r requirements.txt '.[cuda]'
    return
  fi
  on_hosts_in_parallel install host_install_script || die "install failed on: ${FAILED_HOSTS[*]}"
}

cmd_preflight() {
  if [ ${#HOSTS[@]} = 0 ]; then
    run sh -c "$(preflight_script "$ROOT" "$PYTHON_BIN" "$LOG_DIR" "$(main_args 0)")" ||
      die "preflight failed (FAIL lines above): training was not started"
    return
  fi
  if on_hosts_in_parallel preflight host_preflight_script; then return 0; fi
  note "the failing checks of every host:"
  local i
  for i in "${!HOSTS[@]}"; do
    on_host "$i" "$(preflight_failures_script "$REMOTE_DIR/logs")" >&2 || true
  done
  die "preflight failed on: ${FAILED_HOSTS[*]}; training was not started (fix the FAIL lines above, then: $PROG --hosts ... preflight run)"
}

cmd_run() {
  local log
  log=$(log_name)
  if [ ${#HOSTS[@]} = 0 ]; then
    run sh -c "$(start_script "$ROOT" "$PYTHON_BIN" "$LOG_DIR" "$log" "$(main_args 0)")"
  else
    local args i envs
    args=$(main_args 1)
    for i in "${!HOSTS[@]}"; do
      mapfile -t envs < <(process_env "$i")
      on_host "$i" "$(start_script "$REMOTE_DIR/src" ../.venv/bin/python ../logs "$log" "$args" "${envs[@]}")"
    done
  fi
  if [ "$FOLLOW" = 1 ]; then cmd_logs; fi
}

cmd_logs() {
  if [ ${#HOSTS[@]} = 0 ]; then
    run sh -c "$(tail_script "$LOG_DIR")"
  else
    [ "$WORKER" -lt ${#HOSTS[@]} ] || die "--worker $WORKER but the hostfile lists ${#HOSTS[@]} hosts"
    on_host "$WORKER" "$(tail_script "$REMOTE_DIR/logs")"
  fi
}

cmd_stop() {
  if [ ${#HOSTS[@]} = 0 ]; then
    run sh -c "$(stop_script "$LOG_DIR")"
    return
  fi
  local i
  for i in "${!HOSTS[@]}"; do
    on_host "$i" "$(stop_script "$REMOTE_DIR/logs")"
  done
}

mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) need_value "$1" $#; HOSTFILE=$2; shift 2 ;;
    --coordinator) need_value "$1" $#; COORDINATOR=$2; shift 2 ;;
    --port) need_value "$1" $#; need_uint "$1" "$2"; PORT=$2; shift 2 ;;
    --python) need_value "$1" $#; PYTHON_BIN=$2; shift 2 ;;
    --log-dir) need_value "$1" $#; LOG_DIR=$2; shift 2 ;;
    *) parse_common "$@"; shift "$CONSUMED" ;;
  esac
done

[ ${#COMMANDS[@]} -gt 0 ] || { usage >&2; die "no command given"; }
if [ -n "$HOSTFILE" ]; then read_hosts; fi
# Relative paths are taken from where the script was called; local steps run in the checkout.
if [[ $LOG_DIR != /* ]]; then LOG_DIR=$PWD/$LOG_DIR; fi
if [[ $PYTHON_BIN == */* && $PYTHON_BIN != /* ]]; then PYTHON_BIN=$PWD/$PYTHON_BIN; fi
cd "$ROOT"

STEPS=()
for command in "${COMMANDS[@]}"; do
  case $command in
    up)
      if [ ${#HOSTS[@]} -gt 0 ]; then STEPS+=(deploy); fi
      STEPS+=(install preflight run) ;;
    deploy|install|preflight|run|logs|stop) STEPS+=("$command") ;;
    *) die "unknown command '$command' (see $PROG --help)" ;;
  esac
done

trap remove_tarball EXIT
for step in "${STEPS[@]}"; do
  "cmd_$step"
done
