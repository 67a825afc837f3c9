#include "run_ctr.hpp"

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <span>
#include <vector>

#include <shmps/worker.hpp>

#include "ctr.hpp"
#include "ctr_data.hpp"
#include "run_common.hpp"

namespace shmps::trainer {

namespace {

// The reference schedule of the click-through model for one worker: the training rows in order,
// global batch j = rows j*batch .. (no shuffle). Per batch, `fetch` fills the batch's distinct
// rows (batch.unique().size() x 16) and the head (a pull_rows and two pulls, or a gather from a
// local table); `apply` consumes the gradients (a push_rows and two pushes, or a local SGD step)
// and is told how many of this worker's batches are then done. The first `start_batch` batches
// of the schedule are skipped, as train() does.
using CtrFetch = std::function<void(const shmps::ctr::Batch&, std::span<float>, shmps::ctr::Head&)>;
using CtrApply = std::function<void(const shmps::ctr::Batch&, const shmps::ctr::Grads&, std::uint64_t)>;

TrainStats train_ctr(const shmps::data::Schedule& sched, const shmps::ctr::Labeler& labeler, const CtrFetch& fetch,
                     const CtrApply& apply, std::uint64_t start_batch = 0) {
  namespace ctr = shmps::ctr;
  const auto batch = static_cast<std::size_t>(sched.batch);
  std::vector<std::uint64_t> ids(batch * ctr::kFields);
  std::vector<std::int32_t> y(batch);
  std::vector<float> rows;
  ctr::Batch b;
  ctr::Head head;
  ctr::Grads grads;

  const std::uint64_t epochs = sched.epochs();
  const std::uint64_t total = sched.worker_total_batches();
  TrainStats st;
  Progress progress(st, epochs, total);

  for (std::uint64_t e = 0; e < epochs; ++e) {
    const std::vector<std::uint64_t> js = sched.worker_batches(e);
    std::uint64_t k = 0;
    for (const std::uint64_t j : js) {
      ++k;
      if (st.batches_done < start_batch) {  // done by this slot's previous process
        ++st.batches_done;
        continue;
      }
      const std::uint64_t first = j * sched.batch;
      const auto n = static_cast<std::size_t>(std::min(sched.batch, sched.n - first));
      const std::span<const std::int32_t> ys(y.data(), n);
      ctr::fill_samples(labeler, first, std::span(ids.data(), n * ctr::kFields), std::span(y.data(), n));
      b.assign(std::span(ids.data(), n * ctr::kFields), ys);
      rows.resize(b.unique().size() * ctr::kDim);
      fetch(b, rows, head);
      const ctr::BatchResult r = ctr::forward_backward(b, rows, head, grads);
      apply(b, grads, ++st.batches_done);
      progress.add(r.loss, r.correct, n);

      progress.batch(e, k, js.size());
    }
    progress.end_epoch();
  }
  st.seconds = progress.seconds();
  return st;
}

void print_ctr_model_eval(const shmps::ctr::Model& model, const shmps::ctr::Labeler& labeler, bool eval_train) {
  namespace ctr = shmps::ctr;
  if (eval_train) print_eval("train", ctr::evaluate(model, labeler, 0, eval_rows(ctr::kTrainRows)), 0);
  print_eval("test", ctr::evaluate(model, labeler, ctr::kTestFirstRow, eval_rows(ctr::kTestRows)), ctr::kTestFirstRow);
  std::printf("weights-hash 0x%016" PRIx64 "\n", ctr::weights_hash(model));
}

// The training figures, then (when this worker has the model: --local, or rank 0) its evaluation.
void print_final_ctr(const TrainStats& st, const shmps::ctr::Model* model, const shmps::ctr::Labeler& labeler,
                     bool eval_train) {
  print_training_figures(st);
  if (model != nullptr) print_ctr_model_eval(*model, labeler, eval_train);
  std::fflush(stdout);
}

// The segment must hold the click-through model: the table emb [2^20, 16], head.weight [1, 16]
// and head.bias [1] (models/ctr.toml).
void check_ctr_model(const shmps::Worker& w) {
  namespace ctr = shmps::ctr;
  const auto fail = [&w](const std::string& what) {
    throw shmps::Error("segment '" + w.segment() + "': " + what +
                       "; start the server with the click-through model spec (models/ctr.toml)");
  };
  const shmps::ParamInfo& emb = w.param(ctr::kEmbName);  // throws Error if missing
  if (!emb.is_table() || emb.rows != ctr::kRows || emb.dim != ctr::kDim)
    fail("emb is not a table of 1048576 rows of 16 values");
  if (w.param(ctr::kHeadWeightName).size != ctr::kDim) fail("head.weight does not have 16 elements");
  if (w.param(ctr::kHeadBiasName).size != 1) fail("head.bias does not have 1 element");
}

// The whole model: every row of the table and the head.
void pull_ctr_model(shmps::Worker& w, shmps::ctr::Model& model) {
  namespace ctr = shmps::ctr;
  std::vector<std::uint64_t> all(ctr::kRows);
  for (std::uint64_t r = 0; r < ctr::kRows; ++r) all[r] = r;
  model.emb.resize(ctr::kRows * ctr::kDim);
  w.pull_rows(ctr::kEmbName, all, model.emb);
  w.pull(ctr::kHeadWeightName, model.head.weight_span());
  w.pull(ctr::kHeadBiasName, model.head.bias_span());
}

}  // namespace

int run_ctr(const CtrOptions& o) {
  namespace data = shmps::data;
  namespace ctr = shmps::ctr;
  const ctr::Labeler labeler;

  if (o.evaluate) {
    if (o.rank < 0) ::unsetenv("SHMPS_RANK");  // SHMPS_RANK belongs to the training worker
    shmps::Worker w(shmps::WorkerOptions{.segment = o.segment, .rank = o.rank});
    check_ctr_model(w);
    ctr::Model model;
    pull_ctr_model(w, model);
    w.leave();
    const auto t0 = Clock::now();
    print_ctr_model_eval(model, labeler, true);
    std::printf("evaluated in %.2f s\n", seconds_since(t0));
    return 0;
  }

  data::Schedule sched;
  sched.n = ctr::kTrainRows;
  sched.batch = o.batch;
  sched.samples = o.samples;

  if (o.local) {
    sched.workers = o.workers > 0 ? o.workers : 1;
    sched.rank = o.rank >= 0 ? static_cast<std::uint64_t>(o.rank) : 0;
    if (sched.rank >= sched.workers) {
      throw shmps::Error("--rank " + std::to_string(sched.rank) + " must be below --workers " +
                         std::to_string(sched.workers));
    }
    const auto lr = static_cast<float>(o.lr);
    ctr::Model model = ctr::reference_init();
    std::printf("local ctr: %" PRIu64 " samples, batch %" PRIu64 ", SGD lr %g, %" PRIu64 " epoch(s), worker %" PRIu64
                "/%" PRIu64 ", %" PRIu64 " batches\n",
                sched.samples, sched.batch, o.lr, sched.epochs(), sched.rank, sched.workers,
                sched.worker_total_batches());
    std::fflush(stdout);
    // The same data path as against a server: the batch's distinct rows are copied out (a local
    // pull_rows), and only those rows are updated (a local push_rows and apply).
    const TrainStats st = train_ctr(
        sched, labeler,
        [&model](const ctr::Batch& b, std::span<float> rows, ctr::Head& head) {
          ctr::gather_rows(model.emb, b.unique(), rows);
          head = model.head;
        },
        [&model, lr](const ctr::Batch& b, const ctr::Grads& g, std::uint64_t) {
          ctr::sgd_rows(model.emb, b.unique(), g.rows, lr);
          ctr::sgd_head(model.head, g.head, lr);
        });
    print_final_ctr(st, &model, labeler, true);
    return 0;
  }

  shmps::Worker w(shmps::WorkerOptions{.segment = o.segment, .rank = o.rank});
  check_ctr_model(w);
  const std::uint64_t start_batch = join_job(w, sched, o.rank, o.workers, o.consistency);

  std::optional<std::uint64_t> last_seq;
  std::deque<std::uint64_t> unapplied;  // the last push of each of this worker's recent steps
  const TrainStats st = train_ctr(
      sched, labeler,
      [&w, &o, &unapplied](const ctr::Batch& b, std::span<float> rows, ctr::Head& head) {
        // --max-unapplied: in ASP and SSP the pull does not wait for the server, and a worker
        // faster than the server's applies trains on a model a ring's worth of its own steps
        // old; with plain SGD at learning rate 1.0 that diverges. Waiting until at most N of its
        // own steps are pending bounds that (in BSP the pull waits for more anyway).
        if (o.max_unapplied) {
          while (unapplied.size() > *o.max_unapplied) {
            w.wait_applied(unapplied.front());
            unapplied.pop_front();
          }
        }
        w.pull_rows(ctr::kEmbName, b.unique(), rows);
        w.pull(ctr::kHeadWeightName, head.weight_span());
        w.pull(ctr::kHeadBiasName, head.bias_span());
      },
      [&w, &o, &last_seq, &unapplied, &sched](const ctr::Batch& b, const ctr::Grads& g, std::uint64_t batches_done) {
        w.push_rows(ctr::kEmbName, b.unique(), g.rows);
        w.push(ctr::kHeadWeightName, g.head.weight_span());
        last_seq = w.push(ctr::kHeadBiasName, g.head.bias_span());
        if (o.max_unapplied) unapplied.push_back(*last_seq);
        // The end of this worker's step: its three pushes and the cursor past them are committed
        // together (in BSP the step counts whole or not at all).
        w.save_state(cursor_bytes(sched, batches_done));
        w.clock();
      },
      start_batch);
  if (last_seq) w.wait_applied(*last_seq);
  // Rank 0 evaluates the model as it stands once its last push is applied: a pull of every row
  // (64 MiB) rather than of the test rows' only, so that the weights hash covers the whole model.
  std::optional<ctr::Model> model;
  if (sched.rank == 0) pull_ctr_model(w, model.emplace());
  w.leave();  // done: the others no longer wait for this worker
  print_final_ctr(st, model ? &*model : nullptr, labeler, o.eval_train);
  return 0;
}

}  // namespace shmps::trainer
