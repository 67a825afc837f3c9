// shmps-worker: the example trainer. Trains the reference MLP on the reference synthetic data
// (docs/workloads.md) through a shmps parameter server, or locally (--local, the
// single-process reference), or evaluates the server's current model (--evaluate).
//
// Per batch (server mode): read the four parameters (BSP: zero-copy views of the segment; ASP
// and SSP: a pull into a private copy), forward/backward, push the four gradients; the server
// applies its optimizer. Worker r of P takes the global batches j ≡ r (mod P).

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <shmps/worker.hpp>

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
  const auto t0 = Clock::now();
  auto last_print = t0;
  std::uint64_t next_decile = 1;

  for (std::uint64_t e = 0; e < epochs; ++e) {
    const std::vector<std::uint64_t> js = sched.worker_batches(e);
    if (js.empty()) continue;
    const std::vector<std::uint64_t> order = data::epoch_order(e, sched.n);
    double loss_sum = 0.0;
    std::uint64_t correct = 0, seen = 0, k = 0;
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
      loss_sum += r.loss * static_cast<double>(b);
      correct += r.correct;
      seen += b;
      ++k;
      ++st.batches;
      st.samples += b;

      const auto now = Clock::now();
      const bool decile = st.batches_done * 10 >= next_decile * total;
      if (decile || now - last_print >= std::chrono::seconds(2)) {
        while (next_decile <= 10 && st.batches_done * 10 >= next_decile * total) ++next_decile;
        last_print = now;
        const double secs = seconds_since(t0);
        std::printf("epoch %" PRIu64 "/%" PRIu64 " batch %" PRIu64 "/%zu %3" PRIu64
                    "%% loss %.3f acc %.3f %.0f samples/s\n",
                    e + 1, epochs, k, js.size(), st.batches_done * 100 / total,
                    loss_sum / static_cast<double>(seen), static_cast<double>(correct) / static_cast<double>(seen),
                    secs > 0 ? static_cast<double>(st.samples) / secs : 0.0);
        std::fflush(stdout);
      }
    }
    if (seen == 0) continue;  // the whole epoch was done before a restart
    st.last_epoch_loss = loss_sum / static_cast<double>(seen);
    st.last_epoch_acc = static_cast<double>(correct) / static_cast<double>(seen);
    st.last_epoch_samples = seen;
  }
  st.seconds = seconds_since(t0);
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
// Hogwild reads; a switch away from BSP in mid-batch likewise).
shmps::mlp::ParamViews read_params(shmps::Worker& w, std::optional<shmps::mlp::Tensors>& copy) {
  namespace mlp = shmps::mlp;
  mlp::ParamViews params;
  if (w.consistency() == "bsp") {
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps example trainer: the reference 784-256-10 MLP on the reference synthetic data"};
  std::string segment;
  int rank = -1;
  std::uint64_t samples = 400000;
  std::uint64_t batch = 64;
  std::uint64_t workers = 0;
  double lr = 0.05;
  bool evaluate = false;
  bool local = false;
  bool eval_train = false;
  app.add_option("--segment", segment, "job segment name (default: $SHMPS_SEGMENT)");
  app.add_option("--rank", rank, "worker slot (default: $SHMPS_RANK, else the first free slot)")
      ->check(CLI::Range(-1, 1 << 20));
  app.add_option("--samples", samples, "training samples over the whole run (all workers)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "global batch size")->capture_default_str()->check(CLI::PositiveNumber);
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
  app.add_option("--lr", lr, "learning rate of --local")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_flag("--eval-train", eval_train,
               "at the end also evaluate the final model on the whole training set (always with --local)");
  app.add_option("--eval-rows", g_eval_rows,
                 "evaluate on the first N rows of the training and of the test set only (a quick check; default: all)")
      ->check(CLI::PositiveNumber);
  eval_flag->excludes(local_flag);
  CLI11_PARSE(app, argc, argv);

  try {
    namespace data = shmps::data;
    namespace mlp = shmps::mlp;

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
                w.segment().c_str(), w.consistency().c_str(), sched.rank, sched.workers, samples, batch, sched.epochs(),
                sched.worker_total_batches());
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
