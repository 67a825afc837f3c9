#!/usr/bin/env bash
# The installed Python module, imported the way a user imports it: by Debian's /usr/bin/python3,
# without PYTHONPATH, from where `cmake --install` put it.
#   1. --prefix /usr (as the .deb): the package is in lib/python3/dist-packages/shmps.
#   2. --prefix /usr/local, staged with DESTDIR into a temp dir that is bind-mounted over /usr/local
#      in a private mount namespace (unshare --mount: the machine's /usr/local is not touched):
#      `import shmps` must find it there, and it pushes and pulls against a live server.
# Step 2 needs root and unshare; without them it is skipped (exit 77), saying why.
# usage: test_python.sh BUILD_DIR CMAKE PYTHON
tag=install-py
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build=$1 cmake=$2 python=$3
watchdog 80

echo "== DESTDIR=<tmp>/usr-root cmake --install $build --prefix /usr"
DESTDIR=$tmp/usr-root timeout 60 "$cmake" --install "$build" --prefix /usr >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "cmake --install failed (is everything built? cmake --build $build)"; }
for f in __init__.py reference.py; do
  [[ -f $tmp/usr-root/usr/lib/python3/dist-packages/shmps/$f ]] || fail "/usr/lib/python3/dist-packages/shmps/$f is not installed"
done
ls "$tmp"/usr-root/usr/lib/python3/dist-packages/shmps/_core.*.so >/dev/null ||
  fail "the extension _core is not in /usr/lib/python3/dist-packages/shmps"

if [[ $(id -u) != 0 ]]; then
  echo "SKIP: the import check needs root (unshare --mount, to bind a temp dir over /usr/local)"
  exit 77
fi
if ! unshare --mount true 2>/dev/null; then
  echo "SKIP: unshare --mount is not permitted here (the import check binds a temp dir over /usr/local)"
  exit 77
fi

echo "== DESTDIR=<tmp>/root cmake --install $build --prefix /usr/local"
DESTDIR=$tmp/root timeout 60 "$cmake" --install "$build" --prefix /usr/local >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "cmake --install failed"; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
expect=/usr/local/lib/python$pyver/dist-packages/shmps
[[ -f $tmp/root$expect/__init__.py ]] || fail "the module is not in $expect"

write_spec
start_server "$tmp/root/usr/local/bin/shmps-server"

cat >"$tmp/check.py" <<'PY'
import sys

import numpy as np

import shmps

expect, segment = sys.argv[1], sys.argv[2]
assert shmps.__file__ == expect + "/__init__.py", f"imported {shmps.__file__}, expected it under {expect}"
assert shmps._core.__file__.startswith(expect + "/_core."), shmps._core.__file__
g = np.array([1, 2, 3, -4, 5, -6], dtype=np.float32)
with shmps.Worker(segment, rank=-1, timeout=10.0) as w:
    values, _ = w.pull("w")
    assert values.ravel().tolist() == [0.0] * 6, values
    w.wait_applied(w.push("w", g))
    values, version = w.pull("w")
    assert values.ravel().tolist() == (-g).tolist(), values
    assert version == 1, version
print("python: ok,", shmps.__file__)
PY
echo "== /usr/bin/python3 -I, no PYTHONPATH, $tmp/root/usr/local bound over /usr/local"
# -I: no PYTHON* variables, no user site, not the current directory: only the system's paths.
timeout 30 unshare --mount bash -c 'mount --bind "$1/usr/local" /usr/local && cd / &&
  exec env -u PYTHONPATH "$2" -I "$3" "$4" "$5"' _ "$tmp/root" "$python" "$tmp/check.py" "$expect" "$seg" ||
  fail "the installed module did not import or work (above)"

stop_server
echo "PASS"
