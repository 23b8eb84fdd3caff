#!/usr/bin/env bash
# Run prime_jax on a Cloud TPU slice through a GCP queued resource: request it, wait until
# it is ACTIVE, ship git HEAD to every worker, install, start main on all workers (one JAX
# process per worker, --config.distributed=True), follow the log, stop, delete.
# See launch/README.md ("Run on a TPU pod").
set -euo pipefail

PROG=tpu.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_name=${USER:-run}
default_name=${default_name,,}
NAME=${PRIME_TPU_NAME:-prime-${default_name//[^a-z0-9-]/-}}
PROJECT=${PRIME_TPU_PROJECT:-}
ZONE=${PRIME_TPU_ZONE:-us-east5-a}
ACCELERATOR=${PRIME_TPU_ACCELERATOR_TYPE:-v5p-16}
RUNTIME=${PRIME_TPU_RUNTIME_VERSION:-}
PROVISIONING=${PRIME_TPU_PROVISIONING:-spot}
POLL_INTERVAL=${PRIME_TPU_POLL_INTERVAL:-30}
WAIT_TIMEOUT=${PRIME_TPU_WAIT_TIMEOUT:-3600}
DELETE_WAIT=0

usage() {
  cat <<EOF
Usage: launch/tpu.sh [options] COMMAND... [-- main overrides...]

Commands (run in the order given):
  up        create, wait, deploy, install, preflight, run
  create    request the queued resource (gcloud compute tpus queued-resources create)
  wait      poll its state until ACTIVE; fail on FAILED/SUSPENDING/SUSPENDED or timeout
  deploy    pack git HEAD, copy it to all workers, unpack into <remote-dir>/src
  install   on all workers: bubblewrap (apt), venv (uv), pip install -r requirements.txt '.[tpu]'
  preflight on all workers: python -m prime_jax.preflight (devices, workdir, model, data, verifiers,
            sandbox, memory); a FAIL on any worker stops here and prints every worker's FAIL lines
  run       on all workers: nohup python -m prime_jax.main --config=... --config.distributed=True
  logs      tail the newest log on one worker (--worker N)
  stop      SIGTERM main on all workers (it checkpoints and exits)
  status    describe the queued resource
  delete    delete the queued resource and its TPU VMs (--force, --async unless --wait)

TPU options (environment variable in brackets):
  --name NAME              queued resource and TPU node name [PRIME_TPU_NAME] (default: prime-\$USER)
  --project ID             GCP project [PRIME_TPU_PROJECT] (default: gcloud's configured project)
  --zone ZONE              [PRIME_TPU_ZONE] (default: us-east5-a)
  --accelerator-type TYPE  [PRIME_TPU_ACCELERATOR_TYPE] (default: v5p-16)
  --runtime-version V      TPU software version [PRIME_TPU_RUNTIME_VERSION]
                           (default by type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                           v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot | --reserved | --on-demand
                           provisioning model [PRIME_TPU_PROVISIONING=spot|reserved|on-demand]
                           (default: spot)
  --poll-interval SECONDS  between state checks in 'wait' [PRIME_TPU_POLL_INTERVAL] (default: 30)
  --timeout SECONDS        give up waiting after this long [PRIME_TPU_WAIT_TIMEOUT] (default: 3600)
  --wait                   'delete' blocks until the resource is gone

$(common_usage)

Example:
  launch/tpu.sh --project my-proj --workdir gs://my-bucket/qwen7b up --follow
  launch/tpu.sh --project my-proj delete
EOF
}

default_runtime() {  # accelerator-type
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# Flags every gcloud TPU call takes.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [ -n "$PROJECT" ]; then LOCATION+=("--project=$PROJECT"); fi
}

on_all_workers() {  # script
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$1"
}

cmd_create() {
  local provisioning=()
  case $PROVISIONING in
    spot) provisioning=(--spot) ;;
    reserved) provisioning=(--reserved) ;;
    on-demand) ;;
  esac
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${provisioning[@]}"
}

cmd_wait() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
    "--format=value(state.state)")
  show "${describe[@]}"
  if [ "$DRY_RUN" = 1 ]; then
    note "dry run: would repeat this every ${POLL_INTERVAL}s until ACTIVE (timeout ${WAIT_TIMEOUT}s)"
    return 0
  fi
  local deadline=$((SECONDS + WAIT_TIMEOUT)) state
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE)
        note "queued resource $NAME is ACTIVE"
        return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING)
        die "queued resource $NAME is $state, it will not become ACTIVE; see why with:" \
          "gcloud compute tpus queued-resources describe $(quote "$NAME" "${LOCATION[@]}")" ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "timed out after ${WAIT_TIMEOUT}s waiting for queued resource $NAME to become ACTIVE" \
        "(last state: ${state:-none}); it stays queued: wait again with '$PROG wait' or delete it"
    fi
    note "queued resource $NAME is ${state:-not reported yet}; checking again in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
  done
}

cmd_deploy() {
  make_tarball
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$TARBALL_NAME" "${LOCATION[@]}" --worker=all
  on_all_workers "$(unpack_script)"
}

cmd_install() {
  on_all_workers "$(install_script tpu)"
}

cmd_preflight() {
  if on_all_workers "$(preflight_script "$REMOTE_DIR/src" ../.venv/bin/python ../logs "$(main_args 1)")"; then
    return 0
  fi
  note "preflight failed; the failing checks of every worker:"
  on_all_workers "$(preflight_failures_script "$REMOTE_DIR/logs")" >&2 || true
  die "preflight failed: training was not started (fix the FAIL lines above, then: $PROG preflight run)"
}

cmd_run() {
  on_all_workers "$(start_script "$REMOTE_DIR/src" ../.venv/bin/python ../logs "$(log_name)" "$(main_args 1)")"
  if [ "$FOLLOW" = 1 ]; then cmd_logs; fi
}

cmd_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
    --command "$(tail_script "$REMOTE_DIR/logs")"
}

cmd_stop() {
  on_all_workers "$(stop_script "$REMOTE_DIR/logs")"
}

cmd_status() {
  run gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
}

cmd_delete() {
  local mode=(--async)
  if [ "$DELETE_WAIT" = 1 ]; then mode=(); fi
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet "${mode[@]}"
}

# Remove the local tarball; after a failed step, which leaves the slice billed, say how to
# delete it.
on_exit() {
  local rc=$?
  remove_tarball
  if [ "$rc" != 0 ] && [ "$DRY_RUN" != 1 ]; then
    note "if you no longer need the TPU slice (it is billed while it exists):" \
      "$0 --name $(quote "$NAME") --zone $(quote "$ZONE")${PROJECT:+ --project $(quote "$PROJECT")} delete"
  fi
}

mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
  case $1 in
    --name) need_value "$1" $#; NAME=$2; shift 2 ;;
    --project) need_value "$1" $#; PROJECT=$2; shift 2 ;;
    --zone) need_value "$1" $#; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; ACCELERATOR=$2; shift 2 ;;
    --runtime-version) need_value "$1" $#; RUNTIME=$2; shift 2 ;;
    --spot) PROVISIONING=spot; shift ;;
    --reserved) PROVISIONING=reserved; shift ;;
    --on-demand) PROVISIONING=on-demand; shift ;;
    --poll-interval) need_value "$1" $#; POLL_INTERVAL=$2; shift 2 ;;
    --timeout) need_value "$1" $#; WAIT_TIMEOUT=$2; shift 2 ;;
    --wait) DELETE_WAIT=1; shift ;;
    *) parse_common "$@"; shift "$CONSUMED" ;;
  esac
done

[ ${#COMMANDS[@]} -gt 0 ] || { usage >&2; die "no command given"; }
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lowercase letters, digits and '-', starting with a letter, got '$NAME'"
case $PROVISIONING in
  spot|reserved|on-demand) ;;
  *) die "PRIME_TPU_PROVISIONING must be spot, reserved or on-demand, got '$PROVISIONING'" ;;
esac
need_uint --poll-interval "$POLL_INTERVAL"
need_uint --timeout "$WAIT_TIMEOUT"
RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
location_flags

STEPS=()
for command in "${COMMANDS[@]}"; do
  case $command in
    up) STEPS+=(create wait deploy install preflight run) ;;
    create|wait|deploy|install|preflight|run|logs|stop|status|delete) STEPS+=("$command") ;;
    *) die "unknown command '$command' (see $PROG --help)" ;;
  esac
done

trap on_exit EXIT
for step in "${STEPS[@]}"; do
  "cmd_$step"
done
