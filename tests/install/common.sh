# Shared by the install tests: a temp dir, a unique segment, a server, and cleanup on every path.
# The caller sets `tag` and then sources this file (bash).
set -euo pipefail

tmp=$(mktemp -d -t "shmps-$tag.XXXXXX")
seg="t-$tag-$$-$RANDOM"
server_pid=
watchdog_pid=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  [[ -n $watchdog_pid ]] && kill "$watchdog_pid" 2>/dev/null || true
  rm -f "/dev/shm/shmps.$seg" "/dev/shm/shmps.$seg.server.lock" "/dev/shm/shmps.$seg.slots.lock"
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted" >&2; exit 1' INT TERM

# The internal bound, below ctest's TIMEOUT: fail (and clean up) rather than hang.
watchdog() {
  local limit=$1 self=$$
  # Its sleep holds no output pipe (ctest would wait for it) and dies with it.
  (
    sleep "$limit" </dev/null >/dev/null 2>&1 &
    sleep_pid=$!
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    wait "$sleep_pid"
    echo "FAIL: still running after ${limit}s (watchdog)" >&2
    kill -TERM "$self"
  ) &
  watchdog_pid=$!
}

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# A tiny job: one parameter w[2, 3] of zeros, SGD with lr = 1 (integer gradients stay exact).
write_spec() {
  cat >"$tmp/spec.toml" <<SPEC
name = "unused"
slice_bytes = 64
max_workers = 2
server_threads = 1

[optimizer]
kind = "sgd"
lr = 1.0

[[param]]
name = "w"
shape = [2, 3]
init = "zeros"
SPEC
}

# start_server PROGRAM: runs it on the spec with the unique name; returns once it is ready.
start_server() {
  "$1" --spec "$tmp/spec.toml" --name "$seg" --remove-on-stop --threads 1 >"$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do
    grep -q 'event=ready' "$tmp/server.log" && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/server.log" >&2; fail "the server exited before it was ready"; }
    sleep 0.1
  done
  cat "$tmp/server.log" >&2
  fail "the server was not ready within 20 s"
}

# stop_server: SIGTERM, a clean exit, and the segment gone (--remove-on-stop).
stop_server() {
  kill -TERM "$server_pid"
  local rc=0
  wait "$server_pid" || rc=$?
  server_pid=
  ((rc == 0)) || { cat "$tmp/server.log" >&2; fail "the server exited with $rc after SIGTERM"; }
  [[ ! -e /dev/shm/shmps.$seg ]] || fail "the server left /dev/shm/shmps.$seg behind"
}
