# ctest bench_quick: runs `shmps-bench --quick` and checks that it succeeded and that every
# workload produced its figures, each a finite number (a workload that silently stops running,
# or prints nan, fails here). Speed is never checked: --quick sizes mean little.
#   cmake -DBENCH=<shmps-bench> -DOUT=<file> -P check_bench.cmake
execute_process(COMMAND "${BENCH}" --quick --out "${OUT}" RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE errors)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "shmps-bench --quick failed (${status}):\n${output}\n${errors}")
endif()
include(${CMAKE_CURRENT_LIST_DIR}/figures.cmake)
check_figures("shmps-bench --quick" "${OUT}"
  limit.memcpy limit.sgd limit.sgd.2threads limit.pingpong.rtt
  pull.ratio push.ratio push.zero-copy.ratio push.fill-then-push push.zero-copy.commit
  latency.p50 latency.p99 latency.ratio latency.p99.ratio
  apply.sgd.ratio apply.sgd.same_memory.ratio apply.sgd.2threads.ratio apply.adam.vs_sgd apply.adam.2threads.vs_sgd
  apply.design.out_of_place.ratio apply.design.chunk_copy.ratio
  push-to-apply.1.ratio push-to-apply.2.ratio push-to-apply.zero-copy.1.ratio push-to-apply.zero-copy.2.ratio
  bsp-round.ratio bsp-round.checkpointing.ratio checkpoint.time
  train.local train.asp.1.ratio train.asp.2.ratio train.bsp.2.ratio train.ssp2.2.ratio
  train.local.test_acc train.asp.1.test_acc train.asp.2.test_acc train.bsp.2.test_acc train.ssp2.2.test_acc
  scale.asp.1.applied scale.asp.2.applied scale.bsp.1.applied scale.bsp.2.applied scale.asp.2.busy scale.bsp.2.busy
  scale.asp.2.shm scale.bsp.2.shm scale.asp.2.worker_rss scale.bsp.2.worker_rss
  sparse-pull.ratio sparse-push.ratio sparse-round.64 sparse-round.hot.64
  sparse-push.rowwise_adagrad.ratio sparse-push.adagrad.ratio sparse-push.adam.ratio
  sparse-push.keyed.ratio sparse-pull.keyed.ratio sparse-push.keyed.evicting.ratio sparse-pull.keyed.evicting.ratio
  sparse-train.local.cpp sparse-train.1.cpp.ratio sparse-train.2.cpp.ratio sparse-train.2.cpp.test_acc
  sparse-train.2.cpp.rowwise.ratio sparse-train.2.cpp.rowwise.test_acc
  bf16.f32.pull bf16.bf16.pull bf16.bf16.pull-raw bf16.bf16.push bf16.bf16.apply.sgd bf16.bf16.apply.adam
  train.bf16.asp.2.ratio train.bf16.bsp.2.ratio train.bf16.asp.2.test_acc.min train.bf16.bsp.2.test_acc.min)
