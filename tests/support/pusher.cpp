// shmps-test-pusher: a worker for the multi-process tests.
//
//   shmps-test-pusher exact   --pushes K   pushes the pattern.hpp gradients up to push K (continuing
//                                          after its slot's last committed push), waits until applied
//       --zero-copy: each push is a Worker::borrow_push filled in place and committed.
//       --chunk-floats C: the job's ring is smaller than a push, so pushes stream through it in
//       chunks of C elements (Worker::push), each with its own sequence number: the pusher
//       finds the push its slot's last committed chunk belongs to, expects unfinished_push() to
//       report exactly the chunks committed of it, and pushes it again (the library sends only
//       the rest) before going on.
//       --hold: then borrows push K+1 (zero-copy), fills it, prints "holding" and sleeps without
//       committing (a process to be killed while it holds a filled buffer).
//       --pause-us U: sleeps U microseconds after each push (a run long enough to kill things in).
//       --clock-every N: calls clock() after every N-th push (a step of N pushes in BSP: the
//       soak switches consistency live under these pushers).
//       With server groups the pattern's rank is SHMPS_GLOBAL_RANK (the rank in the whole job).
//   shmps-test-pusher rows --keys: the same rows pushes to a table with keys = "u64", row id i
//       sent as the key key_of_id(i) (pattern.hpp).
//   shmps-test-pusher keyed-churn --pushes N --millis T: 16 keys a push from N keys (pattern.hpp).
//   shmps-test-pusher uniform --pushes K   pushes all-ones gradients to the whole of "u"
//   shmps-test-pusher put                  puts "big" whole: element k = 1 + k % 97 (Worker::put)
//   shmps-test-pusher put-push-hold        puts "w" (element k = 10 + k % 97), pushes 100s to all of it
//                                          (its open step), prints "holding" and sleeps, attached
//   shmps-test-pusher puller  --millis T   pulls "u" slice by slice for T ms and checks that every
//                                          slice is whole: all its values equal -(its version)
//   shmps-test-pusher steps   --workers P --steps B [--extra E] [--check] [--slow-ms X]
//                             [--absent R:S] [--hang-at S]
//       waits until P workers are attached (not with --no-wait-for-peers), then does B + E*rank steps: pull "w" and "b" (which
//       waits as the consistency model says), push the pattern gradients of (rank, step) to the
//       whole of "w" and "b", clock(). --check (BSP, bsp_aggregate = "sum", lr 1): before step t
//       the pulled values must equal minus the sum of the gradients of every step before t of
//       every rank that took part in it (rank R stops taking part at step S with --absent R:S).
//       --slow-ms sleeps that long per step. --hang-at S: at step S push "w" only, then sleep
//       forever (a worker to be killed in the middle of a step). Prints its clocks and the
//       largest staleness its pulls saw. --stop-at R:S: rank R, at step S, pushes "w" only, then SIGSTOPs
//       itself (a straggler, alive but stuck); once continued, go on with the step. Only the
//       slot's first process does (generation 1), and only it waits for its peers: a restarted
//       one (shmps-launch --kill-stragglers) runs its steps from 0 without stopping. --resume: keep the next step in the resume state
//       (save_state before every clock()) and start from it (a restarted or restored worker
//       continues its schedule).
//   shmps-test-pusher views  --steps B [--slow-ms X]
//       BSP through zero-copy views (Worker::view), continuing from its resume state (the next
//       step, committed with every clock()): each step takes view() of "w", "b" and a range of "w",
//       reads them, then pulls copies of both and checks every element read against its copy; pushes the
//       pattern gradients of (rank, step), sleeps X ms (the other workers end their steps
//       meanwhile), checks the whole views against the copies again, and only then calls clock().
//       The views must also keep their addresses from step to step. Prints "view_mismatches N".
//   shmps-test-pusher group-steps --workers P --steps B [--check] [--slow-ms X] [--hang-at S]
//                                 [--absent R:S]
//       BSP in a job with worker groups: group_steps.cpp.
// Segment and rank come from SHMPS_SEGMENT / SHMPS_RANK. Exit code 0 on success.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <span>
#include <iostream>
#include <string>
#include <vector>

#include <thread>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "group_steps.hpp"
#include "pattern.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: shmps-test-pusher exact|uniform|puller [--pushes K] [--millis T]\n";
    return 2;
  }
  const std::string mode = argv[1];
  std::uint64_t pushes = 100, millis = 1000, workers = 1, steps = 10, extra = 0, slow_ms = 0, chunk_floats = 0, pause_us = 0, clock_every = 0;
  std::int64_t absent_rank = -1, absent_step = 0, hang_at = -1, stop_rank = -1, stop_at = -1;
  bool check = false, wait_for_peers = true, resume = false, zero_copy = false, hold = false, keys = false;
  for (int i = 2; i < argc; ++i) {
    const std::string key = argv[i];
    const std::string value = i + 1 < argc ? argv[i + 1] : "";
    if (key == "--check") {
      check = true;
      continue;
    }
    if (key == "--no-wait-for-peers") {
      wait_for_peers = false;
      continue;
    }
    if (key == "--resume") {
      resume = true;
      continue;
    }
    if (key == "--zero-copy") {
      zero_copy = true;
      continue;
    }
    if (key == "--keys") {
      keys = true;
      continue;
    }
    if (key == "--hold") {
      hold = true;
      continue;
    }
    ++i;
    if (key == "--pushes") pushes = std::stoull(value);
    else if (key == "--millis") millis = std::stoull(value);
    else if (key == "--chunk-floats") chunk_floats = std::stoull(value);
    else if (key == "--workers") workers = std::stoull(value);
    else if (key == "--steps") steps = std::stoull(value);
    else if (key == "--extra") extra = std::stoull(value);
    else if (key == "--slow-ms") slow_ms = std::stoull(value);
    else if (key == "--pause-us") pause_us = std::stoull(value);
    else if (key == "--clock-every") clock_every = std::stoull(value);
    else if (key == "--hang-at") hang_at = std::stoll(value);
    else if (key == "--stop-at") {
      stop_rank = std::stoll(value.substr(0, value.find(':')));
      stop_at = std::stoll(value.substr(value.find(':') + 1));
    }
    else if (key == "--absent") {
      absent_rank = std::stoll(value.substr(0, value.find(':')));
      absent_step = std::stoll(value.substr(value.find(':') + 1));
    }
  }
  try {
    shmps::Worker w;
    if (mode == "exact") {
      const std::size_t w_size = w.param("w").size, b_size = w.param("b").size;
      std::vector<float> grad(w_size);
      std::uint64_t last = w.published();
      const char* global_rank = std::getenv("SHMPS_GLOBAL_RANK");
      const auto rank = global_rank ? std::stoull(global_rank) : static_cast<std::uint64_t>(w.rank());
      // A restarted pusher continues after the last push its slot committed, whatever
      // generation committed it: push k has sequence number k + 1.
      // Zero-copy: the pattern is written straight into the ring.
      auto borrow_and_fill = [&](std::uint64_t k) {
        const auto plan = shmps::test::plan_push(rank, k, w_size, b_size);
        shmps::PushBuffer buf = w.borrow_push(plan.param, plan.offset, plan.count);
        for (std::uint64_t j = 0; j < plan.count; ++j) buf.data()[j] = shmps::test::pattern(rank, k, plan.offset + j);
        return buf;
      };
      std::uint64_t first_push = w.published();
      if (chunk_floats != 0) {
        // Push k takes stream_chunks() sequence numbers: find the one holding the slot's last.
        std::uint64_t seq_end = 0;
        first_push = 0;
        while (true) {
          const auto plan = shmps::test::plan_push(rank, first_push, w_size, b_size);
          const std::uint64_t chunks = shmps::test::stream_chunks(plan.offset, plan.count, chunk_floats);
          if (seq_end + chunks > w.published()) {
            const std::uint64_t committed_chunks = w.published() - seq_end;
            const auto unfinished = w.unfinished_push();
            std::uint64_t committed = 0;
            for (std::uint64_t c = 0, b = plan.offset; c < committed_chunks; ++c)
              committed = (b = std::min(plan.offset + plan.count, b / chunk_floats * chunk_floats + chunk_floats)) - plan.offset;
            const bool expected = committed_chunks == 0 ? !unfinished.has_value()
                                                        : unfinished && unfinished->name == plan.param &&
                                                              unfinished->offset == plan.offset &&
                                                              unfinished->count == plan.count &&
                                                              unfinished->committed == committed;
            if (!expected) {
              std::cerr << "push " << first_push << " has " << committed_chunks << " of " << chunks
                        << " chunks committed, but unfinished_push() says "
                        << (unfinished ? unfinished->name + " [" + std::to_string(unfinished->offset) + ", +" +
                                             std::to_string(unfinished->count) + ") committed " +
                                             std::to_string(unfinished->committed)
                                       : std::string("nothing")) << "\n";
              return 1;
            }
            if (committed_chunks != 0) std::cout << "finishing push " << first_push << " after " << committed << " elements\n";
            break;
          }
          seq_end += chunks;
          ++first_push;
        }
      }
      for (std::uint64_t k = first_push; k < pushes; ++k) {
        if (zero_copy) {
          last = borrow_and_fill(k).commit();
          continue;
        }
        const auto plan = shmps::test::plan_push(rank, k, w_size, b_size);
        for (std::uint64_t j = 0; j < plan.count; ++j) grad[j] = shmps::test::pattern(rank, k, plan.offset + j);
        last = w.push(plan.param, plan.offset, std::span<const float>(grad.data(), plan.count));
        if (clock_every != 0 && (k + 1) % clock_every == 0) w.clock();
        if (pause_us) std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
      }
      if (last) w.wait_applied(last);
      if (hold) {
        shmps::PushBuffer held = borrow_and_fill(pushes);
        std::cout << "holding push " << pushes + 1 << " of " << held.size() << " elements" << std::endl;
        std::this_thread::sleep_for(std::chrono::hours(1));
      }
      std::cout << "rank " << rank << " pushed " << last << " applied " << w.applied() << "\n";
      return 0;
    }
    if (mode == "put-push-hold") {
      std::vector<float> values(w.param("w").size);
      for (std::size_t k = 0; k < values.size(); ++k) values[k] = 10.0f + static_cast<float>(k % 97);
      w.put("w", values);
      w.push("w", std::vector<float>(values.size(), 100.0f));
      std::cout << "holding" << std::endl;
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (mode == "put") {
      std::vector<float> values(w.param("big").size);
      for (std::size_t k = 0; k < values.size(); ++k) values[k] = 1.0f + static_cast<float>(k % 97);
      w.put("big", values);
      std::cout << "put\n";
      return 0;
    }
    if (mode == "rows") {
      // Tables: pattern.hpp's rows pushes to "t", continuing after the slot's last committed
      // push (push k has sequence number k + 1), borrowed in place with --zero-copy.
      const std::uint64_t rows = w.param("t").rows, dim = w.param("t").dim;
      const auto rank = static_cast<std::uint64_t>(w.rank());
      std::vector<std::uint64_t> ids(shmps::test::kRowsPerPush);
      std::vector<float> grads(ids.size() * dim);
      std::uint64_t last = w.published();
      for (std::uint64_t k = w.published(); k < pushes; ++k) {
        for (std::uint64_t j = 0; j < ids.size(); ++j) {
          ids[j] = shmps::test::rows_push_id(rank, k, j, rows);
          if (keys) ids[j] = shmps::test::key_of_id(ids[j]);
          for (std::uint64_t d = 0; d < dim; ++d) grads[j * dim + d] = shmps::test::pattern(rank, k, j * dim + d);
        }
        if (zero_copy) {
          shmps::PushBuffer buf = w.borrow_push_rows("t", ids.size());
          std::copy(ids.begin(), ids.end(), buf.ids().begin());
          std::copy(grads.begin(), grads.end(), buf.span().begin());
          last = buf.commit();
        } else {
          last = w.push_rows("t", ids, grads);
        }
        if (last != k + 1) {
          std::cerr << "push " << k << " got sequence number " << last << "\n";
          return 1;
        }
        if (pause_us != 0) std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
      }
      if (last != 0) w.wait_applied(last);
      std::cout << "pushed " << last << "\n";
      return 0;
    }
    if (mode == "keyed-churn") {
      // A table "t" with keys = "u64": pushes of 16 keys at a time from key_of_id(0 ..
      // --pushes - 1) (more keys than the table has slots: keys are evicted and admitted all the
      // time), each row churn_grad(key, d), for --millis ms and at least 20 pushes.
      const std::uint64_t dim = w.param("t").dim;
      std::vector<std::uint64_t> ids(16);
      std::vector<float> grads(ids.size() * dim);
      std::uint64_t last = 0, n = static_cast<std::uint64_t>(w.rank()) * 7919;
      const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
      // At least 20 pushes (320 distinct keys), however slow the process (a sanitized one).
      for (int done = 0; std::chrono::steady_clock::now() < end || done < 20; ++done) {
        for (std::uint64_t j = 0; j < ids.size(); ++j, ++n) {
          ids[j] = shmps::test::key_of_id((n * 2654435761ULL) % pushes);
          for (std::uint64_t d = 0; d < dim; ++d) grads[j * dim + d] = shmps::test::churn_grad(ids[j], d);
        }
        last = w.push_rows("t", ids, grads);
      }
      if (last != 0) w.wait_applied(last);
      std::cout << "pushed " << last << "\n";
      return 0;
    }
    if (mode == "hot-rows") {
      // Pushes all-ones rows to the hot rows 0 to 7 of "t" (each twice per push) for --millis ms:
      // every element of a row always holds the same value, so a torn row read shows.
      const std::uint64_t dim = w.param("t").dim;
      std::vector<std::uint64_t> ids;
      for (std::uint64_t j = 0; j < 16; ++j) ids.push_back(j % 8);
      const std::vector<float> ones(ids.size() * dim, 1.0f);
      std::uint64_t last = 0;
      const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
      while (std::chrono::steady_clock::now() < end) last = w.push_rows("t", ids, ones);
      if (last != 0) w.wait_applied(last);
      std::cout << "pushed " << last << "\n";
      return 0;
    }
    if (mode == "uniform") {
      std::vector<float> ones(w.param("u").size, 1.0f);
      std::uint64_t last = 0;
      for (std::uint64_t k = 0; k < pushes; ++k) last = w.push("u", ones);
      w.wait_applied(last);
      std::cout << "pushed " << last << "\n";
      return 0;
    }
    if (mode == "puller") {
      const std::size_t size = w.param("u").size;
      const std::size_t slice = 16384;  // the test's slice_bytes / 4
      std::vector<float> buf(slice);
      std::uint64_t pulls = 0, torn = 0, max_version = 0;
      const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
      while (std::chrono::steady_clock::now() < end) {
        for (std::size_t off = 0; off < size; off += slice) {
          const std::size_t n = std::min(slice, size - off);
          const std::uint64_t version = w.pull("u", off, std::span<float>(buf.data(), n));
          for (std::size_t i = 0; i < n; ++i)
            if (buf[i] != -static_cast<float>(version)) {
              ++torn;
              break;
            }
          ++pulls;
          max_version = std::max(max_version, version);
        }
      }
      std::cout << "pulls " << pulls << " torn " << torn << " max_version " << max_version << "\n";
      return torn == 0 && pulls > 0 ? 0 : 1;
    }
    if (mode == "steps") {
      const std::size_t w_size = w.param("w").size, b_size = w.param("b").size;
      const auto rank = static_cast<std::uint64_t>(w.rank());
      // Start together, so that every rank takes part from step 0 (unless told to join whenever).
      if (stop_at >= 0 && static_cast<std::int64_t>(rank) != stop_rank) stop_at = -1;
      if (stop_at >= 0 && w.generation() > 1) {  // restarted: it stops no more, and its peers may be done
        stop_at = -1;
        wait_for_peers = false;
      }
      if (wait_for_peers) {
        auto seg = shmps::shm::Segment::open(w.segment(), shmps::shm::Access::read_only);
        const auto attached = static_cast<std::uint32_t>(shmps::shm::SlotState::attached);
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        for (bool all = false; !all;) {
          all = true;
          for (std::uint64_t r = 0; r < workers; ++r)
            all = all && shmps::shm::load_acquire(seg.slot(r).state) == attached;
          if (std::chrono::steady_clock::now() > until) throw shmps::Error("the other workers did not attach");
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      }
      auto takes_part = [&](std::uint64_t r, std::uint64_t k) {
        if (k >= steps + extra * r) return false;
        return !(static_cast<std::int64_t>(r) == absent_rank && static_cast<std::int64_t>(k) >= absent_step);
      };
      std::vector<double> want_w(w_size, 0.0), want_b(b_size, 0.0);
      std::vector<float> pw(w_size), pb(b_size), gw(w_size), gb(b_size);
      const std::uint64_t my_steps = steps + extra * rank;
      const std::uint64_t first_clock = w.current_clock();
      std::uint64_t last = 0, wrong_steps = 0, first_step = 0;
      if (resume) {
        const auto state = w.load_state();
        if (state.size() == sizeof first_step) std::memcpy(&first_step, state.data(), sizeof first_step);
      }
      for (std::uint64_t k = 0; k < my_steps; ++k) {
        if (k < first_step) {  // done before a restart: only the expected sums move on
          if (check)
            for (std::uint64_t r = 0; r < workers; ++r)
              if (takes_part(r, k)) {
                for (std::size_t i = 0; i < w_size; ++i) want_w[i] -= shmps::test::pattern(r, k, i);
                for (std::size_t i = 0; i < b_size; ++i) want_b[i] -= shmps::test::pattern(r, k, i);
              }
          continue;
        }
        w.pull("w", pw);
        w.pull("b", pb);
        if (check) {
          std::size_t wrong = 0;
          for (std::size_t i = 0; i < w_size; ++i) wrong += static_cast<double>(pw[i]) != want_w[i];
          for (std::size_t i = 0; i < b_size; ++i) wrong += static_cast<double>(pb[i]) != want_b[i];
          if (wrong) {
            ++wrong_steps;
            std::cout << "step " << k << ": " << wrong << " values differ from the exact sum\n";
          }
          for (std::uint64_t r = 0; r < workers; ++r)
            if (takes_part(r, k)) {
              for (std::size_t i = 0; i < w_size; ++i) want_w[i] -= shmps::test::pattern(r, k, i);
              for (std::size_t i = 0; i < b_size; ++i) want_b[i] -= shmps::test::pattern(r, k, i);
            }
        }
        for (std::size_t i = 0; i < w_size; ++i) gw[i] = shmps::test::pattern(rank, k, i);
        for (std::size_t i = 0; i < b_size; ++i) gb[i] = shmps::test::pattern(rank, k, i);
        last = w.push("w", gw);
        if (static_cast<std::int64_t>(k) == hang_at) {
          std::cout << "hanging in step " << k << std::endl;
          std::this_thread::sleep_for(std::chrono::hours(1));
        }
        if (static_cast<std::int64_t>(k) == stop_at) {
          std::cout << "stopping in step " << k << " (pid " << ::getpid() << ")" << std::endl;
          ::raise(SIGSTOP);
          std::cout << "continued in step " << k << std::endl;
        }
        last = w.push("b", gb);
        if (resume) {
          const std::uint64_t next = k + 1;
          w.save_state(std::as_bytes(std::span<const std::uint64_t>(&next, 1)));
        }
        w.clock();
        if (slow_ms) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
      }
      w.wait_applied(last);
      auto seg = shmps::shm::Segment::open(w.segment(), shmps::shm::Access::read_only);
      std::cout << "rank " << rank << " steps " << my_steps << " first_step " << first_step << " first_clock " << first_clock << " clock "
                << w.current_clock() << " max_staleness "
                << shmps::shm::load_acquire(seg.slot(rank).max_staleness) << " wrong_steps " << wrong_steps << "\n";
      return wrong_steps == 0 ? 0 : 1;
    }
    if (mode == "views") {
      const std::size_t w_size = w.param("w").size, b_size = w.param("b").size;
      const auto rank = static_cast<std::uint64_t>(w.rank());
      std::uint64_t first_step = 0, last = 0, mismatches = 0;
      if (const auto state = w.load_state(); state.size() == sizeof first_step)
        std::memcpy(&first_step, state.data(), sizeof first_step);
      std::vector<float> pw(w_size), pb(b_size), gw(w_size), gb(b_size);
      std::vector<float> sw(w_size), sb(b_size), sr(w_size / 3);  // what the views showed at first
      const float* w_address = nullptr;
      // Every element of `view` against `copy`; counts and reports the differing ones.
      auto compare = [&](std::span<const float> view, const float* copy, const char* what, std::uint64_t k) {
        if (std::memcmp(view.data(), copy, view.size_bytes()) == 0) return;
        std::size_t wrong = 0, first = 0;
        for (std::size_t i = 0; i < view.size(); ++i)
          if (std::memcmp(&view[i], &copy[i], sizeof(float)) != 0 && wrong++ == 0) first = i;
        mismatches += wrong;
        std::cout << "step " << k << " clock " << w.current_clock() << ": " << what << ": " << wrong
                  << " elements of the view differ from the pulled copy, first [" << first << "] " << view[first]
                  << " != " << copy[first] << std::endl;
      };
      for (std::uint64_t k = first_step; k < steps; ++k) {
        const std::span<const float> vw = w.view("w");
        const std::span<const float> vb = w.view("b");
        const std::size_t offset = (k * 977 + rank * 131) % (w_size / 2), count = w_size / 3;
        const std::span<const float> vr = w.view("w", offset, count);
        if (w_address == nullptr) w_address = vw.data();
        if (vw.data() != w_address || vr.data() != vw.data() + offset || vw.size() != w_size || vb.size() != b_size ||
            vr.size() != count) {
          std::cout << "step " << k << ": a view moved or has the wrong size" << std::endl;
          ++mismatches;
        }
        // Read through the views first, then pull: a view that returned before its step's values
        // were there (no wait) would differ from the pull, which waits.
        std::memcpy(sw.data(), vw.data(), vw.size_bytes());
        std::memcpy(sb.data(), vb.data(), vb.size_bytes());
        std::memcpy(sr.data(), vr.data(), vr.size_bytes());
        w.pull("w", pw);
        w.pull("b", pb);
        compare(sw, pw.data(), "w", k);
        compare(sb, pb.data(), "b", k);
        compare(sr, pw.data() + offset, "range of w", k);
        for (std::size_t i = 0; i < w_size; ++i) gw[i] = shmps::test::pattern(rank, k, i);
        for (std::size_t i = 0; i < b_size; ++i) gb[i] = shmps::test::pattern(rank, k, i);
        w.push("w", gw);
        last = w.push("b", gb);
        if (slow_ms) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
        // The end of the step: nothing may have changed under the views since the pulls.
        compare(vw, pw.data(), "w before clock()", k);
        compare(vb, pb.data(), "b before clock()", k);
        const std::uint64_t next = k + 1;
        w.save_state(std::as_bytes(std::span<const std::uint64_t>(&next, 1)));
        w.clock();
      }
      if (last) w.wait_applied(last);
      std::cout << "rank " << rank << " steps " << first_step << ".." << steps << " clock " << w.current_clock()
                << " view_mismatches " << mismatches << std::endl;
      return mismatches == 0 ? 0 : 1;
    }
    if (mode == "group-steps")
      return shmps::test::run_group_steps(w, {.workers = workers, .steps = steps, .slow_ms = slow_ms, .hang_at = hang_at,
                                              .absent_rank = absent_rank, .absent_step = absent_step, .check = check});
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  } catch (const shmps::Error& e) {
    std::cerr << "shmps-test-pusher: " << e.what() << "\n";
    return 1;
  }
}
