// shmps-worker: the example trainer. Trains the reference MLP on the reference synthetic data
// (docs/workloads.md) through a shmps parameter server, or locally (--local, the
// single-process reference), or evaluates the server's current model (--evaluate). With
// --model ctr, the same for the sparse click-through model (docs/workloads.md §4, run_ctr.hpp);
// what both share is in run_common.hpp.
//
// Per batch (server mode): read the four parameters (BSP: zero-copy views of the segment; ASP
// and SSP: a pull into a private copy), forward/backward, push the four gradients; the server
// applies its optimizer. Worker r of P takes the global batches j ≡ r (mod P).

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <shmps/worker.hpp>

#include "ctr.hpp"
#include "mlp.hpp"
#include "run_common.hpp"
#include "run_ctr.hpp"
#include "synthetic_data.hpp"

namespace {

using namespace shmps::trainer;

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

// The final figures. `eval_train`: also evaluate the final model on the whole training set (the
// reference training loss/accuracy of docs/workloads.md §2 are defined that way).
void print_final(const TrainStats& st, const shmps::mlp::Tensors& params, bool eval_train) {
  namespace data = shmps::data;
  print_training_figures(st);
  if (eval_train) print_eval("train", shmps::mlp::evaluate(params, 0, eval_rows(data::kTrainRows)), 0);
  print_eval("test", shmps::mlp::evaluate(params, data::kTestFirstRow, eval_rows(data::kTestRows)), data::kTestFirstRow);
  std::printf("weights-hash 0x%016" PRIx64 "\n", shmps::mlp::weights_hash(params));
  std::fflush(stdout);
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
