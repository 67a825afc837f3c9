#include "recovery.hpp"

#include <spdlog/spdlog.h>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>

#include "apply_chunks.hpp"
#include "consistency.hpp"
#include "redo.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

void check_same_model(const Segment& segment, const ModelSpec& spec, std::uint64_t spec_hash) {
  const SegmentHeader& h = segment.header();
  // Said on its own, before the hash (which covers it too), so that the fix is named.
  if (h.optimizer.kind == spec.optimizer.kind && optimizer_state_arrays(spec.optimizer.kind) > 0 &&
      h.optimizer.state_dtype != spec.optimizer.state_dtype)
    throw Error("segment '" + spec.name + "' already exists and keeps its optimizer state in " +
                std::string(to_string(h.optimizer.state_dtype)) + ", but " + spec.source + " asks for state_dtype = \"" +
                std::string(to_string(spec.optimizer.state_dtype)) + "\": set state_dtype = \"" +
                std::string(to_string(h.optimizer.state_dtype)) + "\" in [optimizer] to continue the segment; to change it, have the segment's server write a checkpoint "
                "(shmps-ctl checkpoint " + spec.name + " FILE), remove the segment (`shmps-ctl destroy " + spec.name +
                "`) and start with --restore FILE: the checkpoint's state is converted");
  if (h.spec_hash != spec_hash)
    throw Error("segment '" + spec.name + "' already exists and holds another model than " + spec.source +
                " (parameter names, shapes, slice size, worker slots, optimizer kind or state_dtype differ): give this "
                "job another name (--name), or remove the old segment with `shmps-ctl destroy " + spec.name + "`");
  // An automatic ring size takes the segment's rings as they are; an explicit one must match.
  if (spec.ring_bytes != 0 && align_up(spec.ring_bytes, kCacheLine) != h.ring_bytes)
    throw Error("segment '" + spec.name + "' already exists with rings of " + std::to_string(h.ring_bytes) +
                " bytes, but ring_bytes " + std::to_string(spec.ring_bytes) + " was asked for: leave ring_bytes out (0) "
                "to continue the segment with its rings, or remove the segment (`shmps-ctl destroy " + spec.name +
                "`, after a checkpoint if its state matters) to make it again with other rings");
}

}  // namespace

void recover_segment(Segment& segment, const ServerOptions& options, std::uint64_t spec_hash) {
  const ModelSpec& spec = options.spec;
  check_same_model(segment, spec, spec_hash);
  SegmentHeader& h = segment.header();
  // A redo entry still marked valid: the previous server died while writing a slice. Finish the
  // write (a whole-slice copy again, idempotent; a chunked update from its pending chunk on) so
  // the slice holds exactly its new values and its exactly-once row.
  std::uint64_t replayed = 0;
  for (std::uint32_t i = 0; i < h.redo_count; ++i) {
    RedoEntry& e = segment.redo(i);
    if (load_acquire(e.valid) == 0) continue;
    if (e.mode == RedoMode::whole || e.mode == RedoMode::rows) {
      copy_in(segment, e);
      // Done: an entry left marked valid would be replayed again by a later server, over
      // whatever this one writes meanwhile (and its next writer would fill a "valid" entry).
      store_release(e.valid, 0U);
    } else
      finish_chunked(segment, e);  // computes the rest of the slice from the inputs the entry names
    ++replayed;
  }
  // With the redo log every odd word has a valid entry; an odd word without one is damage.
  std::uint64_t odd = 0;
  for (std::uint64_t i = 0; i < h.slice_count; ++i) {
    SliceEntry& slice = segment.slice(i);
    const std::uint64_t v = load_own(slice.version);
    if (v & 1U) {
      store_release(slice.version, v + 1);
      ++odd;
    }
  }
  if (replayed)
    spdlog::warn("event=redo segment={} slices_replayed={} note=\"the previous server died while writing them; their "
                 "updates are now complete, applied once\"",
                 spec.name, replayed);
  if (odd)
    spdlog::error("event=repair segment={} slices_without_redo={} note=\"version words left odd with no redo entry: "
                  "those slices may mix two updates\"",
                  spec.name, odd);
  if (options.override_policy) apply_spec_policy(segment, spec);
}

}  // namespace shmps::server
