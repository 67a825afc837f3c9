# check_figures(WHO FILE NAMES...): fails unless FILE, written by WHO (a benchmark's --out), holds
# a `name value unit` line with a finite number for every one of NAMES. Included by the ctest
# scripts of the benchmarks' quick modes; speed is never checked there.
function(check_figures who file)
  file(READ "${file}" lines)
  set(missing "")
  foreach(name IN LISTS ARGN)
    string(REPLACE "." "\\." pattern "${name}")
    if(NOT lines MATCHES "(^|\n)${pattern} -?[0-9][0-9.e+-]* [^\n]+")
      list(APPEND missing "${name}")
    endif()
  endforeach()
  if(missing)
    message(FATAL_ERROR "${who} printed no finite figure for: ${missing}\nits figures:\n${lines}")
  endif()
  list(LENGTH ARGN count)
  message(STATUS "${who}: all ${count} expected figures present")
endfunction()
