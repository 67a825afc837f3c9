// shmps-worker: the example trainer. Trains the reference MLP on the reference synthetic data
// (docs/workloads.md) through a shmps parameter server, or locally (--local, the
// single-process reference), or evaluates the server's current model (--evaluate). With
// --model ctr, the same for the sparse click-through model (docs/workloads.md §4, run_ctr).
//
// Per batch (server mode): read the four parameters (BSP: zero-copy views of the segment; ASP
// and SSP: a pull into a private copy), forward/backward, push the four gradients; the server
// applies its optimizer. Worker r of P takes the global batches j ≡ r (mod P).

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <shmps/worker.hpp>

#include "ctr.hpp"
#include "ctr_data.hpp"
#include "mlp.hpp"
#include "synthetic_data.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct TrainStats {
  std::uint64_t batches = 0;
  std::uint64_t samples = 0;
  double seconds = 0.0;
  // Running figures over the last epoch this worker trained in (mean over its samples).
  double last_epoch_loss = 0.0;
  double last_epoch_acc = 0.0;
  std::uint64_t last_epoch_samples = 0;
  std::uint64_t batches_done = 0;  // of this worker's schedule, including those skipped on resume
};

// What both models' training loops report, the same way: each trained batch's loss and hits into
// the epoch's running figures and `st`, a progress line at every tenth of the run and at least
// every 2 s, and at the end of an epoch its means as the last epoch's.
class Progress {
 public:
  Progress(TrainStats& st, std::uint64_t epochs, std::uint64_t total)
      : st_(st), epochs_(epochs), total_(total), t0_(Clock::now()), last_print_(t0_) {}

  // A batch of n samples trained (its mean loss and how many it got right).
  void add(double loss, std::uint64_t correct, std::uint64_t n) {
    loss_sum_ += loss * static_cast<double>(n);
    correct_ += correct;
    seen_ += n;
    ++st_.batches;
    st_.samples += n;
  }
  // After batch k (1-based) of epoch e's `batches`: prints a line when one is due.
  void batch(std::uint64_t e, std::uint64_t k, std::size_t batches) {
    const auto now = Clock::now();
    const bool decile = st_.batches_done * 10 >= next_decile_ * total_;
    if (!decile && now - last_print_ < std::chrono::seconds(2)) return;
    while (next_decile_ <= 10 && st_.batches_done * 10 >= next_decile_ * total_) ++next_decile_;
    last_print_ = now;
    const double secs = seconds();
    std::printf("epoch %" PRIu64 "/%" PRIu64 " batch %" PRIu64 "/%zu %3" PRIu64 "%% loss %.3f acc %.3f %.0f samples/s\n",
                e + 1, epochs_, k, batches, st_.batches_done * 100 / total_, loss_sum_ / static_cast<double>(seen_),
                static_cast<double>(correct_) / static_cast<double>(seen_),
                secs > 0 ? static_cast<double>(st_.samples) / secs : 0.0);
    std::fflush(stdout);
  }
  // The epoch's running figures become the last epoch's (unless it was all done before a restart).
  void end_epoch() {
    if (seen_ != 0) {
      st_.last_epoch_loss = loss_sum_ / static_cast<double>(seen_);
      st_.last_epoch_acc = static_cast<double>(correct_) / static_cast<double>(seen_);
      st_.last_epoch_samples = seen_;
    }
    loss_sum_ = 0.0;
    correct_ = seen_ = 0;
  }
  double seconds() const { return seconds_since(t0_); }

 private:
  TrainStats& st_;
  const std::uint64_t epochs_, total_;
  const Clock::time_point t0_;
  Clock::time_point last_print_;
  std::uint64_t next_decile_ = 1;
  double loss_sum_ = 0.0;
  std::uint64_t correct_ = 0, seen_ = 0;
};

// The reference schedule for one worker. `fetch` gives the parameters before each batch (views of
// the segment, a pull into a copy, or a local model); `apply` consumes the gradients (a push, or a
// local SGD step) and is told how many of this worker's batches are then done. The first
// `start_batch` batches of the schedule are skipped: a restarted worker continues where its
// slot's previous process stopped.
TrainStats train(const shmps::data::Schedule& sched, const std::function<shmps::mlp::ParamViews()>& fetch,
                 const std::function<void(const shmps::mlp::Tensors&, std::uint64_t)>& apply,
                 std::uint64_t start_batch = 0) {
  namespace data = shmps::data;
  namespace mlp = shmps::mlp;
  mlp::Net net(static_cast<std::size_t>(sched.batch));
  mlp::Tensors grads;
  const data::Labeler labeler;
  std::vector<float> x(static_cast<std::size_t>(sched.batch) * data::kFeatures);
  std::vector<std::int32_t> y(static_cast<std::size_t>(sched.batch));

  const std::uint64_t epochs = sched.epochs();
  const std::uint64_t total = sched.worker_total_batches();
  TrainStats st;
  Progress progress(st, epochs, total);

  for (std::uint64_t e = 0; e < epochs; ++e) {
    const std::vector<std::uint64_t> js = sched.worker_batches(e);
    if (js.empty()) continue;
    const std::vector<std::uint64_t> order = data::epoch_order(e, sched.n);
    std::uint64_t k = 0;
    for (const std::uint64_t j : js) {
      if (st.batches_done < start_batch) {  // done by this slot's previous process
        ++st.batches_done;
        ++k;
        continue;
      }
      const auto rows = data::global_batch(order, sched.batch, j);
      const std::size_t b = rows.size();
      const std::span<float> xs(x.data(), b * data::kFeatures);
      const std::span<std::int32_t> ys(y.data(), b);
      data::fill_features(rows, xs);
      labeler.label(rows, xs, ys);
      const mlp::BatchResult r = net.forward_backward(fetch(), xs, ys, grads);
      apply(grads, ++st.batches_done);
      ++k;
      progress.add(r.loss, r.correct, b);

      progress.batch(e, k, js.size());
    }
    progress.end_epoch();
  }
  st.seconds = progress.seconds();
  return st;
}

void print_eval(const char* what, const shmps::mlp::EvalResult& r, std::uint64_t first) {
  std::printf("%s loss %.4f acc %.4f (rows %" PRIu64 "..%" PRIu64 ")\n", what, r.loss, r.accuracy, first,
              first + r.rows - 1);
}

// The final figures. `eval_train`: also evaluate the final model on the whole training set (the
// reference training loss/accuracy of docs/workloads.md §2 are defined that way).
// --eval-rows: evaluate on at most this many rows of each set (a quick check; 0: all of them).
std::uint64_t g_eval_rows = 0;
std::uint64_t eval_rows(std::uint64_t all) { return g_eval_rows == 0 ? all : std::min(all, g_eval_rows); }

void print_final(const TrainStats& st, const shmps::mlp::Tensors& params, bool eval_train) {
  namespace data = shmps::data;
  std::printf("trained %" PRIu64 " batches, %" PRIu64 " samples in %.2f s: %.0f samples/s\n", st.batches,
              st.samples, st.seconds, st.seconds > 0 ? static_cast<double>(st.samples) / st.seconds : 0.0);
  if (st.last_epoch_samples > 0) {
    std::printf("running train loss %.4f acc %.4f (this worker's last epoch, %" PRIu64 " samples)\n",
                st.last_epoch_loss, st.last_epoch_acc, st.last_epoch_samples);
  }
  if (eval_train) print_eval("train", shmps::mlp::evaluate(params, 0, eval_rows(data::kTrainRows)), 0);
  print_eval("test", shmps::mlp::evaluate(params, data::kTestFirstRow, eval_rows(data::kTestRows)), data::kTestFirstRow);
  std::printf("weights-hash 0x%016" PRIx64 "\n", shmps::mlp::weights_hash(params));
  std::fflush(stdout);
}

std::uint64_t world_size_from_env() {
  const char* s = std::getenv("SHMPS_WORLD_SIZE");
  if (s == nullptr || *s == '\0') return 1;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (*end != '\0' || v == 0) {
    throw shmps::Error(std::string("SHMPS_WORLD_SIZE='") + s +
                       "' is not a positive integer; unset it or pass --workers");
  }
  return static_cast<std::uint64_t>(v);
}

// The trainer's resume state: which schedule, and how many of its batches are done.
struct Cursor {
  std::uint64_t magic = 0x3152534e5255434dULL;  // the bytes "MCURNSR1", little-endian
  std::uint64_t samples = 0, batch = 0, workers = 0, rank = 0;
  std::uint64_t batches_done = 0;
};

std::vector<std::byte> cursor_bytes(const shmps::data::Schedule& sched, std::uint64_t batches_done) {
  const Cursor c{.samples = sched.samples, .batch = sched.batch, .workers = sched.workers, .rank = sched.rank,
                 .batches_done = batches_done};
  std::vector<std::byte> out(sizeof c);
  std::memcpy(out.data(), &c, sizeof c);
  return out;
}

// Batches already done by this slot's previous processes (0 for a fresh slot). A cursor from
// another schedule is an error: continuing it would train on the wrong data.
std::uint64_t resume_cursor(const shmps::Worker& w, const shmps::data::Schedule& sched) {
  const std::vector<std::byte> state = w.load_state();
  if (state.empty()) return 0;
  Cursor c;
  if (state.size() != sizeof c) throw shmps::Error("the resume state of slot " + std::to_string(w.rank()) + " is not shmps-worker's");
  std::memcpy(&c, state.data(), sizeof c);
  if (c.magic != Cursor{}.magic) throw shmps::Error("the resume state of slot " + std::to_string(w.rank()) + " is not shmps-worker's");
  if (c.samples != sched.samples || c.batch != sched.batch || c.workers != sched.workers || c.rank != sched.rank)
    throw shmps::Error("slot " + std::to_string(w.rank()) + " was training another schedule (--samples " +
                       std::to_string(c.samples) + " --batch " + std::to_string(c.batch) + " --workers " +
                       std::to_string(c.workers) + "); run with the same options, or use a new segment");
  return c.batches_done;
}

bool all_float32(const shmps::Worker& w) {
  for (const auto& spec : shmps::mlp::kParams)
    if (w.param(spec.name).dtype != shmps::ValueDType::f32) return false;
  return true;
}

void pull_all(shmps::Worker& w, shmps::mlp::Tensors& params) {
  for (std::size_t i = 0; i < shmps::mlp::kParamCount; ++i) w.pull(shmps::mlp::kParams[i].name, params[i]);
}

// The parameters for one batch. BSP: views of the values in the segment, no private copy. Each
// view() waits for the previous step as a pull would, and the values cannot change before this
// worker's clock(), which comes after the forward/backward that reads them: the server never takes
// a step a live worker is still in. ASP and SSP: a pull into `copy`, because there the server
// writes under a view, and one forward/backward would read a model changing mid-batch (Hogwild),
// which is not the reference trainer's behaviour. The mode is read at each batch, so a live switch
// takes effect at the next one (one landing between this check and the views gives that batch
// Hogwild reads; a switch away from BSP in mid-batch likewise). Values stored as bf16 or fp16
// (dtype in the spec) are pulled, widened, into `copy` in every mode: the trainer computes in
// float32, and a view hands out the stored 2-byte elements.
shmps::mlp::ParamViews read_params(shmps::Worker& w, std::optional<shmps::mlp::Tensors>& copy) {
  namespace mlp = shmps::mlp;
  mlp::ParamViews params;
  if (w.consistency() == "bsp" && all_float32(w)) {
    for (std::size_t i = 0; i < mlp::kParamCount; ++i) params[i] = w.view(mlp::kParams[i].name);
    return params;
  }
  if (!copy) copy.emplace();
  pull_all(w, *copy);
  return copy->views();
}

// The segment must hold the reference MLP's four parameters with their sizes.
void check_model(const shmps::Worker& w) {
  for (const auto& spec : shmps::mlp::kParams) {
    const shmps::ParamInfo& p = w.param(spec.name);  // throws Error if missing
    if (p.size != spec.size()) {
      throw shmps::Error("segment '" + w.segment() + "': parameter " + std::string(spec.name) + " has " +
                         std::to_string(p.size) + " elements, the 784-256-10 MLP needs " +
                         std::to_string(spec.size()) + "; start the server with the MLP model spec");
    }
  }
}

// Joins the job with the worker's slot, for either model: this worker's share of the schedule
// (--workers, else $SHMPS_WORLD_SIZE; the rank is the slot's, or $SHMPS_GLOBAL_RANK under server
// groups), the consistency check, the resume cursor, and in BSP the start barrier. Returns how
// many of this worker's batches the slot's previous processes already did.
std::uint64_t join_job(shmps::Worker& w, shmps::data::Schedule& sched, int rank, std::uint64_t workers,
                       const std::string& consistency) {
  sched.workers = workers > 0 ? workers : world_size_from_env();
  if (w.rank() < 0 || static_cast<std::uint64_t>(w.rank()) >= sched.workers) {
    throw shmps::Error("worker slot " + std::to_string(w.rank()) + " is not below the number of workers " +
                       std::to_string(sched.workers) + "; pass --workers (or set SHMPS_WORLD_SIZE)");
  }
  sched.rank = static_cast<std::uint64_t>(w.rank());
  // Server groups (shmps-launch --server-groups): the slot is the rank within the worker's
  // group's replica; the data shard follows the rank in the whole job.
  if (const char* global = std::getenv("SHMPS_GLOBAL_RANK"); global != nullptr && *global != '\0' && rank < 0) {
    char* end = nullptr;
    const unsigned long long g = std::strtoull(global, &end, 10);
    if (*end != '\0' || g >= sched.workers)
      throw shmps::Error(std::string("SHMPS_GLOBAL_RANK='") + global + "' is not a rank below the number of workers " +
                         std::to_string(sched.workers));
    sched.rank = g;
  }
  if (!consistency.empty() && consistency != w.consistency())
    throw shmps::Error("--consistency " + consistency + " asked, but the job runs " + w.consistency() +
                       " (set it on the server: shmps-server --consistency, or shmps-ctl set " + w.segment() +
                       " consistency=" + consistency + ")");
  std::printf("segment %s (%s), worker %" PRIu64 "/%" PRIu64 ": %" PRIu64 " samples, batch %" PRIu64 ", %" PRIu64
              " epoch(s), %" PRIu64 " batches\n",
              w.segment().c_str(), w.consistency().c_str(), sched.rank, sched.workers, sched.samples, sched.batch,
              sched.epochs(), sched.worker_total_batches());
  std::fflush(stdout);

  // Resume: the data cursor the slot's previous process committed with its last step.
  const std::uint64_t start_batch = resume_cursor(w, sched);
  if (start_batch > 0) {
    std::printf("resuming: generation %" PRIu64 " of slot %d continues at batch %" PRIu64 " of %" PRIu64
                " (%" PRIu64 " pushes committed before)\n",
                w.generation(), w.rank(), start_batch + 1, sched.worker_total_batches(), w.published());
    std::fflush(stdout);
  }

  // BSP from the start: every worker in step 0, however late its process starts (else the first
  // one up could finish step 0 alone, and runs would differ). A restarted worker joins at once.
  if (w.consistency() == "bsp" && start_batch == 0 && w.current_clock() == 0) {
    // With server groups (shmps-launch --server-groups) the step is its group's: the barrier
    // waits for the workers of this worker's replica.
    std::uint64_t joining = sched.workers;
    if (const char* group = std::getenv("SHMPS_GROUP_SIZE"); group != nullptr && *group != '\0')
      joining = std::min<std::uint64_t>(sched.workers, std::strtoull(group, nullptr, 10));
    std::printf("waiting for all %" PRIu64 " workers to join step 0\n", joining);
    std::fflush(stdout);
    w.wait_for_workers(joining, std::chrono::minutes(2));
  }
  return start_batch;
}

// ---- The sparse click-through model (--model ctr, docs/workloads.md §4) -----------------------

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

void print_eval(const char* what, const shmps::ctr::EvalResult& r, std::uint64_t first) {
  std::printf("%s loss %.4f acc %.4f (rows %" PRIu64 "..%" PRIu64 ")\n", what, r.loss, r.accuracy, first,
              first + r.rows - 1);
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
  std::printf("trained %" PRIu64 " batches, %" PRIu64 " samples in %.2f s: %.0f samples/s\n", st.batches,
              st.samples, st.seconds, st.seconds > 0 ? static_cast<double>(st.samples) / st.seconds : 0.0);
  if (st.last_epoch_samples > 0) {
    std::printf("running train loss %.4f acc %.4f (this worker's last epoch, %" PRIu64 " samples)\n",
                st.last_epoch_loss, st.last_epoch_acc, st.last_epoch_samples);
  }
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

// What main() parsed, for the click-through model.
struct CtrOptions {
  std::string segment;
  int rank = -1;
  std::uint64_t samples = 0, batch = 0, workers = 0;
  double lr = 0.0;
  bool evaluate = false, local = false, eval_train = false;
  std::string consistency;
  std::optional<std::uint64_t> max_unapplied;  // none: no bound
};

// shmps-worker --model ctr: as the MLP's main() path, with the click-through model. Per batch
// (server mode): the batch's distinct ids, pull_rows of them and pulls of the head,
// forward/backward, push_rows of one gradient row per distinct id and pushes of the head's
// gradients; the server applies its optimizer to the touched rows only.
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps example trainer: the reference 784-256-10 MLP on the reference synthetic data, or the "
               "sparse click-through model (--model ctr)"};
  std::string model = "mlp";
  std::string segment;
  int rank = -1;
  std::uint64_t samples = 400000;
  std::uint64_t batch = 64;
  std::uint64_t workers = 0;
  double lr = 0.05;
  bool evaluate = false;
  bool local = false;
  bool eval_train = false;
  app.add_option("--model", model,
                 "mlp: the reference MLP (models/mlp.toml); ctr: the sparse click-through model (models/ctr.toml)")
      ->capture_default_str()
      ->check(CLI::IsMember({"mlp", "ctr"}));
  app.add_option("--segment", segment, "job segment name (default: $SHMPS_SEGMENT)");
  app.add_option("--rank", rank, "worker slot (default: $SHMPS_RANK, else the first free slot)")
      ->check(CLI::Range(-1, 1 << 20));
  app.add_option("--samples", samples, "training samples over the whole run (all workers; ctr: default 4000000)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "global batch size (ctr: default 256)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--workers", workers,
                 "P: workers sharing the schedule; this one takes the batches j = rank (mod P) "
                 "(default: $SHMPS_WORLD_SIZE, else 1)")
      ->check(CLI::PositiveNumber);
  std::string consistency;
  app.add_option("--consistency", consistency,
                 "the consistency the job must run (bsp, ssp:N, asp); the server sets it, this checks it");
  auto* eval_flag = app.add_flag("--evaluate", evaluate,
                                 "attach, pull the model, print train/test loss and accuracy and the weights hash");
  auto* local_flag = app.add_flag("--local", local, "no parameter server: train a local model with plain SGD");
  app.add_option("--lr", lr, "learning rate of --local (ctr: default 1.0)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_flag("--eval-train", eval_train,
               "at the end also evaluate the final model on the whole training set (always with --local)");
  app.add_option("--eval-rows", g_eval_rows,
                 "evaluate on the first N rows of the training and of the test set only (a quick check; default: all)")
      ->check(CLI::PositiveNumber);
  std::uint64_t max_unapplied = 0;
  app.add_option("--max-unapplied", max_unapplied,
                 "--model ctr in ASP or SSP: pull only once at most N of this worker's own steps are not yet applied "
                 "by the server (default 0: all of them, so one worker trains exactly as --local does; 1: one step in "
                 "flight, faster; a worker faster than the server's applies and bound by nothing trains on its own "
                 "stale rows, which at learning rate 1.0 diverges)");
  eval_flag->excludes(local_flag);
  CLI11_PARSE(app, argc, argv);

  try {
    namespace data = shmps::data;
    namespace mlp = shmps::mlp;

    if (model == "ctr") {
      // The click-through model's reference run where an option is not given (docs/workloads.md §4).
      const auto given = [&app](const char* option) { return app.count(option) > 0; };
      return run_ctr({.segment = segment,
                      .rank = rank,
                      .samples = given("--samples") ? samples : shmps::ctr::kTrainRows,
                      .batch = given("--batch") ? batch : shmps::ctr::kBatch,
                      .workers = workers,
                      .lr = given("--lr") ? lr : 1.0,
                      .evaluate = evaluate,
                      .local = local,
                      .eval_train = eval_train,
                      .consistency = consistency,
                      .max_unapplied = given("--max-unapplied") ? max_unapplied : 0});
    }

    if (evaluate) {
      // Any free slot unless --rank says otherwise (SHMPS_RANK belongs to the training worker).
      if (rank < 0) ::unsetenv("SHMPS_RANK");
      shmps::Worker w(shmps::WorkerOptions{.segment = segment, .rank = rank});
      check_model(w);
      mlp::Tensors params;
      pull_all(w, params);
      w.leave();
      const auto t0 = Clock::now();
      const auto train = mlp::evaluate(params, 0, eval_rows(data::kTrainRows));
      const auto test = mlp::evaluate(params, data::kTestFirstRow, eval_rows(data::kTestRows));
      print_eval("train", train, 0);
      print_eval("test", test, data::kTestFirstRow);
      std::printf("weights-hash 0x%016" PRIx64 "\n", mlp::weights_hash(params));
      std::printf("evaluated in %.2f s\n", seconds_since(t0));
      return 0;
    }

    data::Schedule sched;
    sched.batch = batch;
    sched.samples = samples;

    if (local) {
      sched.workers = workers > 0 ? workers : 1;
      sched.rank = rank >= 0 ? static_cast<std::uint64_t>(rank) : 0;
      if (sched.rank >= sched.workers) {
        throw shmps::Error("--rank " + std::to_string(sched.rank) + " must be below --workers " +
                           std::to_string(sched.workers));
      }
      const auto lr_f = static_cast<float>(lr);
      mlp::Tensors params = mlp::reference_init();
      std::printf("local: %" PRIu64 " samples, batch %" PRIu64 ", SGD lr %g, %" PRIu64 " epoch(s), worker %" PRIu64
                  "/%" PRIu64 ", %" PRIu64 " batches\n",
                  samples, batch, lr, sched.epochs(), sched.rank, sched.workers, sched.worker_total_batches());
      std::fflush(stdout);
      const TrainStats st = train(
          sched, [&params] { return params.views(); },
          [&params, lr_f](const mlp::Tensors& g, std::uint64_t) { mlp::sgd_update(params, g, lr_f); });
      print_final(st, params, true);
      return 0;
    }

    shmps::Worker w(shmps::WorkerOptions{.segment = segment, .rank = rank});
    check_model(w);
    const std::uint64_t start_batch = join_job(w, sched, rank, workers, consistency);

    std::optional<mlp::Tensors> copy;  // a private copy of the model, made only where one is needed
    std::optional<std::uint64_t> last_seq;
    const TrainStats st = train(
        sched, [&w, &copy] { return read_params(w, copy); },
        [&w, &last_seq, &sched](const mlp::Tensors& g, std::uint64_t batches_done) {
          for (std::size_t i = 0; i < mlp::kParamCount; ++i) last_seq = w.push(mlp::kParams[i].name, g[i]);
          // The end of this worker's step: its four pushes and the cursor past them are committed
          // together (in BSP the step counts whole or not at all).
          w.save_state(cursor_bytes(sched, batches_done));
          w.clock();
        },
        start_batch);
    if (last_seq) w.wait_applied(*last_seq);
    // The model as it stands once this worker's last push is applied: a pull, not a view, because
    // it is evaluated after leave(), while the other workers may still be training it.
    mlp::Tensors params;
    pull_all(w, params);
    w.leave();  // done: the others no longer wait for this worker
    print_final(st, params, eval_train);
    return 0;
  } catch (const shmps::Error& e) {
    std::fprintf(stderr, "shmps-worker: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shmps-worker: %s\n", e.what());
    return 1;
  }
}
