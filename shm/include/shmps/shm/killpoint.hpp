// Test-only crash injection. With SHMPS_KILL_AT=<point>[:<n>] in its environment, a process
// SIGKILLs itself the n-th time (default: the first) it passes kill_point("<point>"), so that
// tests can stop a server or a worker at exactly the instruction they want to prove safe.
// Without the variable a kill point costs one predictable branch.
//
// Points: server "apply.mid_copy" (half of a slice copied in from its redo entry),
//         server "apply.mid_rows" (half of a table slice's touched rows, two or more, copied in),
//         server "apply.before_release" (slices applied, ring cursors not yet moved),
//         worker "push.before_commit" (record and payload written, tail not yet stored),
//         server "checkpoint.mid_write" (about half of a checkpoint written to its temporary
//         file), server "checkpoint.before_rename" (temporary file complete and fsynced).
#pragma once

namespace shmps::shm {

void kill_point(const char* point) noexcept;

// Test-only widening of a race window: with SHMPS_PAUSE_AT=<point>:<ms>, the process sleeps <ms>
// milliseconds every time it passes pause_point("<point>"), so that a test can make another
// process act inside the window every time. Points: server "collect.after_scan" (the last ring of
// a BSP step's group read, the step not yet decided).
void pause_point(const char* point) noexcept;

}  // namespace shmps::shm
