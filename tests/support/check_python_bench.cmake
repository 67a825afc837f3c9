# ctest python_bench_quick: runs `tools/bench/python_workers.py --quick` and checks that it succeeded
# and that every figure it compares (the Python worker's pull and push, the C++ ones from
# shmps-bench in the same run, their ratios, the per-call costs) was printed as a finite number.
# Speed is never checked: --quick sizes mean little.
#   cmake -DPYTHON=<python3> -DSCRIPT=<python_workers.py> -DBUILD=<build dir> -DOUT=<file> -P check_python_bench.cmake
execute_process(COMMAND "${PYTHON}" "${SCRIPT}" --quick --no-train --build "${BUILD}" --out "${OUT}"
                RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE errors)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "python_workers.py --quick failed (${status}):\n${output}\n${errors}")
endif()
include(${CMAKE_CURRENT_LIST_DIR}/figures.cmake)
check_figures("python_workers.py --quick" "${OUT}"
  limit.memcpy
  pull.py pull.cpp pull.py.vs_cpp pull.py.ratio pull.cpp.ratio
  pull.alloc.py pull.alloc.py.vs_cpp pull.alloc.py.ratio pull.alloc.py.faults
  push.py push.cpp push.py.vs_cpp push.py.ratio push.cpp.ratio
  small.limit.memcpy
  small.pull.py small.pull.cpp small.pull.cpp.call small.pull.py.call small.pull.py.vs_cpp small.pull.py.overhead
  small.pull.alloc.py small.pull.alloc.py.call small.pull.alloc.py.vs_cpp small.pull.alloc.py.overhead
  small.push.py small.push.cpp small.push.cpp.call small.push.py.call small.push.py.vs_cpp small.push.py.overhead
  call.pull1.py call.push1.py)
