#!/usr/bin/env bash
# An installed shmps, used the way another project uses it:
#   cmake --install BUILD --prefix <tmp>; a program configured outside the tree with
#   find_package(shmps) (consumer/), and the same main.cpp compiled with pkg-config's flags, both
#   run as workers against <tmp>/bin/shmps-server. Also: the installed CMake files carry none of
#   our build flags and name neither the source nor the build tree.
# usage: test_consumer.sh BUILD_DIR SOURCE_DIR CMAKE CXX
tag=install
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build=$1 source_dir=$2 cmake=$3 cxx=$4
watchdog 100

prefix=$tmp/prefix
echo "== cmake --install $build --prefix $prefix"
timeout 60 "$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "cmake --install failed (is everything built? cmake --build $build)"; }

for f in bin/shmps-server bin/shmps-worker bin/shmps-launch bin/shmps-ctl bin/shmps-top \
         include/shmps/worker.hpp include/shmps/error.hpp share/shmps/models/mlp.toml; do
  [[ -e $prefix/$f ]] || fail "$f is not installed"
done
config=$(find "$prefix" -name shmpsConfig.cmake)
pc=$(find "$prefix" -name shmps.pc)
[[ -n $config && -n $pc ]] || fail "shmpsConfig.cmake or shmps.pc is not installed"
echo "installed: ${config#"$prefix"/}, ${pc#"$prefix"/}"
if grep -rnE -- '-march|-Werror|-Wconversion|-fsanitize' "$(dirname "$config")" "$pc"; then
  fail "the installed CMake package or shmps.pc carries shmps' own compile flags (above)"
fi
if grep -rnF -e "$source_dir" -e "$build" "$(dirname "$config")" "$pc"; then
  fail "the installed CMake package or shmps.pc names the source or build tree (above)"
fi

write_spec
start_server "$prefix/bin/shmps-server"

echo "== find_package(shmps) with CMAKE_PREFIX_PATH=$prefix"
timeout 60 "$cmake" -S "$source_dir/tests/install/consumer" -B "$tmp/consumer" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF >"$tmp/consumer.log" 2>&1 &&
  timeout 60 "$cmake" --build "$tmp/consumer" >>"$tmp/consumer.log" 2>&1 ||
  { cat "$tmp/consumer.log" >&2; fail "the consumer did not configure or build"; }
grep -F "shmps 0.1.0 from $prefix/" "$tmp/consumer.log" || { cat "$tmp/consumer.log" >&2; fail "shmps was not found in $prefix"; }
timeout 30 "$tmp/consumer/consumer" "$seg" 1 || fail "the consumer built with find_package failed"

echo "== pkg-config with PKG_CONFIG_PATH=$(dirname "$pc")"
flags=$(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --cflags --libs shmps) || fail "pkg-config does not know shmps"
echo "pkg-config --cflags --libs shmps: $flags"
# shellcheck disable=SC2086  # the flags are words
timeout 60 "$cxx" -std=c++20 -Wall -Wextra -Werror -o "$tmp/consumer_pc" "$source_dir/tests/install/consumer/main.cpp" $flags ||
  fail "main.cpp does not compile and link with pkg-config's flags"
timeout 30 "$tmp/consumer_pc" "$seg" 2 || fail "the consumer built with pkg-config failed"

stop_server
echo "PASS"
