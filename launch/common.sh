# shellcheck shell=bash
# Shared by launch/tpu.sh and launch/gpu.sh (sourced, never run): option parsing for the
# options both take, a dry-run aware command runner, the code tarball, and the shell
# snippets that unpack, install, start, stop and tail prime_jax on a host.
#
# The remote snippets are POSIX sh, so any login shell runs them.
#
# Remote layout (relative to the login directory unless absolute), the same on every host:
#   $REMOTE_DIR/src      the code, replaced by each deploy (git HEAD of this checkout)
#   $REMOTE_DIR/.venv    Python from uv, with requirements.txt + .[tpu] or .[cuda]
#   $REMOTE_DIR/logs     main-<UTC time>.log per launch, latest.log -> newest, main.pid

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly TARBALL_NAME=prime_jax-src.tar.gz
readonly TARBALL="${TMPDIR:-/tmp}/$TARBALL_NAME.$$"

# Shared settings; each may come from the environment, flags override. The sourcing script
# reads them, which shellcheck cannot see from this file alone.
# shellcheck disable=SC2034
{
  CONFIG=${PRIME_CONFIG:-configs/qwen7b.py}
  WORKDIR=${PRIME_WORKDIR:-}
  REMOTE_DIR=${PRIME_REMOTE_DIR:-prime_jax}
  PYTHON_VERSION=${PRIME_PYTHON_VERSION:-3.12}
  WORKER=0
  FOLLOW=0
  DRY_RUN=0
  COMMANDS=()
  EXTRA_ENV=()
  MAIN_ARGS=()
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# One POSIX-shell-quoted string from words: plain words stay as they are, others go in
# single quotes (a quote inside becomes '\'').
quote() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# Print a command as it would be typed; on stdout under --dry-run, else on stderr.
show() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
  fi
}

# Run a command, or only print it under --dry-run.
run() {
  show "$@"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  "$@"
}

need_value() {  # option, remaining-argument-count
  [ "$2" -ge 2 ] || die "option $1 needs a value"
}

need_uint() {  # option-name, value
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# Split --opt=value into --opt value for every argument before a bare '--'.
# Prints the words NUL-separated for: mapfile -d '' ARGS < <(split_equals "$@")
split_equals() {
  while [ $# -gt 0 ]; do
    case $1 in
      --) printf '%s\0' "$@"; return ;;
      --*=*) printf '%s\0%s\0' "${1%%=*}" "${1#*=}" ;;
      *) printf '%s\0' "$1" ;;
    esac
    shift
  done
}

# Parse one option or command word common to both scripts; sets CONSUMED to the number
# of words used. Words after '--' become MAIN_ARGS (overrides passed on to main).
# shellcheck disable=SC2034
parse_common() {
  case $1 in
    --config) need_value "$1" $#; CONFIG=$2; CONSUMED=2 ;;
    --workdir) need_value "$1" $#; WORKDIR=$2; CONSUMED=2 ;;
    --remote-dir) need_value "$1" $#; REMOTE_DIR=$2; CONSUMED=2 ;;
    --python-version) need_value "$1" $#; PYTHON_VERSION=$2; CONSUMED=2 ;;
    --worker) need_value "$1" $#; need_uint "$1" "$2"; WORKER=$2; CONSUMED=2 ;;
    --env)
      need_value "$1" $#
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got '$2'"
      EXTRA_ENV+=("$2"); CONSUMED=2 ;;
    --follow) FOLLOW=1; CONSUMED=1 ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); CONSUMED=$(($# + 1)) ;;
    -*) die "unknown option '$1' (see $PROG --help)" ;;
    *) COMMANDS+=("$1"); CONSUMED=1 ;;
  esac
}

common_usage() {
  cat <<EOF
Options for both launchers (environment variable in brackets):
  --config PATH          config file for main [PRIME_CONFIG] (default: configs/qwen7b.py)
  --workdir DIR          passed to main as --config.workdir, e.g. gs://bucket/run1 [PRIME_WORKDIR]
  --env NAME=VALUE       extra environment for main (repeatable), e.g. WANDB_API_KEY=...
  --remote-dir DIR       directory on each host, relative to home [PRIME_REMOTE_DIR] (default: prime_jax)
  --python-version V     Python that uv installs on hosts [PRIME_PYTHON_VERSION] (default: 3.12)
  --worker N             host whose log 'logs' tails (default: 0)
  --follow               after 'run', tail the log (Ctrl-C stops tailing, not training)
  --dry-run              print every command instead of running it
  -- ARGS...             everything after -- goes to main, e.g. -- --config.actor.lr=1e-6
EOF
}

# main's argument list: config, optional workdir, the multi-process switch, user overrides.
main_args() {  # distributed(0|1)
  local args=("--config=$CONFIG")
  if [ -n "$WORKDIR" ]; then args+=("--config.workdir=$WORKDIR"); fi
  if [ "$1" = 1 ]; then args+=("--config.distributed=True"); fi
  args+=("${MAIN_ARGS[@]}")
  quote "${args[@]}"
}

# Log file name for one launch: main-<UTC time>.log (bash builtin clock, no subprocess).
log_name() {
  local stamp
  TZ=UTC printf -v stamp '%(%Y%m%dT%H%M%SZ)T' -1
  printf 'main-%s.log' "$stamp"
}

# Pack git HEAD of this checkout into $TARBALL (uncommitted changes are not shipped).
make_tarball() {
  if [ "$DRY_RUN" != 1 ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
    note "warning: uncommitted changes are not deployed; shipping HEAD $(git -C "$ROOT" rev-parse --short HEAD)"
  fi
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
}

# For the scripts' EXIT traps.
remove_tarball() {
  if [ "$DRY_RUN" != 1 ]; then rm -f "$TARBALL"; fi
}

# Replace $REMOTE_DIR/src with the tarball copied to ~/$TARBALL_NAME.
unpack_script() {
  local dir
  dir=$(quote "$REMOTE_DIR")
  printf '%s' "set -eu; mkdir -p $dir; cd $dir; rm -rf src; mkdir src; "
  printf '%s' "tar -xzf \"\$HOME\"/$TARBALL_NAME -C src; rm -f \"\$HOME\"/$TARBALL_NAME"
}

# Install bubblewrap, the code verifier's sandbox (without it code items score 0), from the OS
# packages: as root directly, else with sudo (non-interactive). Nothing happens where it is present.
bwrap_install_script() {
  printf '%s' "if ! command -v bwrap >/dev/null 2>&1; then if [ \"\$(id -u)\" = 0 ]; then s=; else s='sudo -n'; fi; "
  printf '%s' "\$s apt-get update -qq && \$s apt-get install -y -qq bubblewrap; fi"
}

# Create $REMOTE_DIR/.venv once (uv fetches the Python version; TPU images ship 3.10) and
# install bubblewrap, the pinned requirements and the accelerator extra of pyproject.toml.
install_script() {  # extra (tpu|cuda)
  printf '%s' "set -eu; $(bwrap_install_script); cd $(quote "$REMOTE_DIR"); export PATH=\"\$HOME/.local/bin:\$PATH\"; "
  printf '%s' "if [ ! -x .venv/bin/python ]; then "
  printf '%s' "command -v uv >/dev/null || python3 -m pip install --user --quiet uv; "
  printf '%s' "uv venv --seed --python $(quote "$PYTHON_VERSION") .venv; fi; "
  printf '%s' "cd src; ../.venv/bin/python -m pip install -r requirements.txt $(quote ".[$1]")"
}

# Run python -m prime_jax.preflight with main's arguments; its lines go to <log-dir>/preflight.log
# and to stdout prefixed by the host name; the exit code is preflight's (non-zero: a check failed).
preflight_script() {  # code-dir python log-dir quoted-main-args [NAME=VALUE...]
  local code=$1 python=$2 logs=$3 main=$4
  shift 4
  local envs=(PYTHONUNBUFFERED=1 "${EXTRA_ENV[@]}" "$@") log
  log=$(quote "$logs/preflight.log")
  printf '%s' "cd $(quote "$code") && mkdir -p $(quote "$logs") || exit 1; "
  printf '%s' "env -u JAX_PLATFORMS $(quote "${envs[@]}") $(quote "$python") -m prime_jax.preflight $main > $log 2>&1 < /dev/null; "
  printf '%s' "rc=\$?; sed \"s/^/\$(hostname): /\" $log; exit \$rc"
}

# The FAIL lines of the last preflight on a host, prefixed by the host name.
preflight_failures_script() {  # log-dir
  printf '%s' "grep ' FAIL ' $(quote "$1/preflight.log") | sed \"s/^/\$(hostname): /\"; true"
}

# Start main in the background (survives the ssh session), unless one is already running.
# JAX_PLATFORMS is removed so JAX picks the accelerator; PYTHONUNBUFFERED streams the log.
start_script() {  # code-dir python log-dir log-name quoted-main-args [NAME=VALUE...]
  local code=$1 python=$2 logs=$3 log=$4 main=$5
  shift 5
  local envs=(PYTHONUNBUFFERED=1 "${EXTRA_ENV[@]}" "$@")
  local pid
  pid=$(quote "$logs/main.pid")
  printf '%s' "set -eu; cd $(quote "$code"); mkdir -p $(quote "$logs"); "
  printf '%s' "if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then "
  printf '%s' "echo \"prime_jax.main already runs on \$(hostname) (pid \$(cat $pid)); stop it first\" >&2; exit 1; fi; "
  printf '%s' "nohup env -u JAX_PLATFORMS $(quote "${envs[@]}") $(quote "$python") -m prime_jax.main $main "
  printf '%s' "> $(quote "$logs/$log") 2>&1 < /dev/null & echo \$! > $pid; "
  printf '%s' "ln -sfn $(quote "$log") $(quote "$logs/latest.log"); "
  printf '%s' "echo \"started prime_jax.main on \$(hostname), pid \$(cat $pid), log \$(readlink -f $(quote "$logs/$log"))\""
}

# SIGTERM the running main (it checkpoints and exits) and wait up to 10 minutes for it.
stop_script() {  # log-dir
  local pid
  pid=$(quote "$1/main.pid")
  printf '%s' "set -eu; if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then p=\$(cat $pid); kill \"\$p\"; "
  printf '%s' "for _ in \$(seq 600); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done; "
  printf '%s' "if kill -0 \"\$p\" 2>/dev/null; then echo \"prime_jax.main (pid \$p) still runs on \$(hostname) after 600 s\" >&2; exit 1; fi; "
  printf '%s' "echo \"stopped prime_jax.main on \$(hostname)\"; else echo \"prime_jax.main not running on \$(hostname)\"; fi"
}

tail_script() {  # log-dir
  printf 'tail -n 100 -F %s' "$(quote "$1/latest.log")"
}
