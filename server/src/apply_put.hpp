// Put records (Worker::put, SINGA's HandlePut) into the slices, before a round's pushes.
//
// A put record is applied only while every slice it covers has had no optimizer update
// (SliceEntry::step == 0) and only for the first rank whose put the server applied
// (ParamStats::put_rank, stored before that put's first slice is written); otherwise it is
// refused: remembered in its slot (put_refused_seq, which Worker::put reads) and logged, and nothing
// changes. An applied put writes each slice through the redo entry (redo.hpp) with its
// exactly-once row, so a server killed mid-put finishes the slice it was copying and skips the
// ones it had done when it takes the record again; it bumps the slice's version by one update
// and leaves its step count and optimizer state as they were.
#pragma once

#include <shmps/shm/segment.hpp>

#include "round.hpp"

namespace shmps::server {

// Applies (or refuses) the plan's puts in order, with redo entry `redo`. Returns the floats written.
std::uint64_t apply_puts(shm::Segment& segment, const RoundPlan& plan, shm::RedoEntry& redo);

}  // namespace shmps::server
