// sparse: the click-through table of docs/workloads.md §4 (2^20 rows of 16 floats, 64 MiB) in a
// job of its own (slices of 64 KiB: 1,024 rows each, as models/ctr.toml), reached by row.
//
//   sparse-pull   Worker::pull_rows of each batch's distinct rows (about 1,350 of the 256
//                 samples' 2,048 ids), over consecutive batches of the data, next to a plain
//                 gather of the same rows out of a table in this process (the limit).
//   sparse-push   Worker::push_rows of the same rows, until the server has applied them all
//                 (push, ring, merge, SGD step of each row, the slice's redo copy), next to a
//                 plain scatter-add p[id] -= lr * g over the same rows in this process.
//   sparse-round  one push of N distinct rows, pushed and waited for alone, N from 64 to 16384:
//                 the round's time against the number of distinct rows; and the same number of
//                 ids all on the one hot row 0 (which the merge makes one row update).
//   sparse-push.<kind>  the same push loop with the table's own optimizer (sgd, rowwise_adagrad,
//                 adagrad, adam), each in a fresh job of its own: what a row's optimizer state
//                 costs the apply (.ratio: / sparse-push.sgd).
//   sparse-push.keyed, sparse-pull.keyed  the same loops with the ids as keys of a table with
//                 keys = "u64" holding every key (.ratio: / sparse-push.sgd, / sparse-pull);
//                 .keyed.evicting with 16,384 slots, so that keys are evicted and admitted again.
//   sparse-train  the click-through model, plain SGD at learning rate 1.0, all in this run:
//                 shmps-worker --model ctr --local and through shmps (1 and 2 workers, ASP, each
//                 pulling once its own steps are applied); the PyTorch example
//                 (worker/python/examples/ctr_torch.py: nn.EmbeddingBag(sparse=True)) --local, through
//                 shmps (1 and 2 workers), and as 2 Hogwild processes; samples/s and test accuracy.
//                 The Python runs need /usr/bin/python3 with torch, else they are skipped (said so).
//                 And 2 C++ workers with the table's own row-wise AdaGrad (lr 0.1; the head keeps
//                 SGD at 1.0): sparse-train.2.cpp.rowwise.
// Rows/s and GB/s count each row's 64 bytes once.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include <shmps/worker.hpp>

#include "ctr_data.hpp"
#include "workloads.hpp"

namespace shmps::bench {
namespace {

constexpr std::uint64_t kDim = ctr::kDim, kRows = ctr::kRows;

// The distinct ids of global batch j (sorted).
std::vector<std::uint64_t> batch_rows(std::uint64_t j) {
  std::vector<std::uint64_t> ids(ctr::kBatch * ctr::kFields);
  ctr::fill_ids(j * ctr::kBatch, ctr::kBatch, ids);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

// A job of the click-through table "emb" (and the harness's one small dense parameter), in
// slices of 64 KiB; `table_extra`: more lines of its [[table]] (its own optimizer).
JobOptions table_job(const std::string& table_extra) {
  return JobOptions{.params = 1,
                    .per_param = kDim,
                    .max_workers = 2,
                    .ring_bytes = std::uint64_t{8} << 20,
                    .slice_bytes = 65536,
                    .extra_spec = "[[table]]\nname = \"emb\"\nrows = " + std::to_string(kRows) + "\ndim = " +
                                  std::to_string(kDim) + "\n" + table_extra};
}

void add_train(Report& r, const std::string& name, const TrainResult& t, const std::string& what,
               const TrainResult* base = nullptr, const std::string& base_name = "") {
  r.add(name, t.samples_per_s, "samples/s", what);
  if (base != nullptr) r.add(name + ".ratio", t.samples_per_s / base->samples_per_s, "x", "/ " + base_name);
  r.add(name + ".test_acc", t.test_acc, "fraction", "final model, the 100,000 test samples");
}

// models/ctr.toml with the table's own row-wise AdaGrad (the last [[table]] is the table), in a
// temporary file of this run, removed with it.
class RowwiseCtrSpec {
 public:
  explicit RowwiseCtrSpec(const std::string& ctr_spec) : path_("/tmp/shmps-bench-ctr-rowwise-" + std::to_string(::getpid()) + ".toml") {
    const std::string cmd = "cat '" + ctr_spec + "' > '" + path_ + "' && echo 'optimizer = { kind = \"rowwise_adagrad\", lr = 0.1 }' >> '" + path_ + "'";
    if (std::system(cmd.c_str()) != 0) throw Error("cannot write " + path_);
  }
  ~RowwiseCtrSpec() { ::unlink(path_.c_str()); }
  RowwiseCtrSpec(const RowwiseCtrSpec&) = delete;
  RowwiseCtrSpec& operator=(const RowwiseCtrSpec&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void run_sparse_train(const Config& cfg, Report& r) {
  const std::string bin = self_dir(), source = SHMPS_SOURCE_DIR;
  const std::string ctr_spec = source + "/models/ctr.toml";
  const std::string samples = std::to_string(cfg.quick ? 51200 : 4000000);
  int job = 0;
  const auto launch = [&](int workers, const std::string& program, const std::string& spec) {
    const std::string name = "bench-ctr-" + std::to_string(::getpid()) + "-" + std::to_string(job++);
    return run_training(bin + "/shmps-launch --spec '" + spec + "' --name " + name + " --workers " +
                            std::to_string(workers) + " --consistency asp --samples " + samples + " -- " + program,
                        "[w0] ");
  };
  const std::string cpp = bin + "/shmps-worker --model ctr";
  const TrainResult local = run_training(cpp + " --local --samples " + samples, "");
  add_train(r, "sparse-train.local.cpp", local, "shmps-worker --model ctr --local, " + samples + " samples");
  const TrainResult one = launch(1, cpp, ctr_spec);
  add_train(r, "sparse-train.1.cpp", one, "1 worker through shmps, ASP", &local, "local.cpp");
  const TrainResult two = launch(2, cpp, ctr_spec);
  add_train(r, "sparse-train.2.cpp", two, "2 workers through shmps, ASP", &one, "1.cpp");
  const RowwiseCtrSpec rowwise_spec(ctr_spec);
  const TrainResult rowwise = launch(2, cpp, rowwise_spec.path());
  add_train(r, "sparse-train.2.cpp.rowwise", rowwise,
            "2 workers, the table's own row-wise AdaGrad (lr 0.1), the head SGD (lr 1.0)", &two, "2.cpp (SGD)");

  const std::string python = "/usr/bin/python3";
  const std::string example = source + "/worker/python/examples/ctr_torch.py";
  const std::string env = "PYTHONPATH='" + bin + "/../python' ";
  if (std::system((env + python + " -c 'import torch, numpy, shmps' > /dev/null 2>&1").c_str()) != 0) {
    r.add("sparse-train.py.skipped", 1, "", "no torch for /usr/bin/python3 (apt-get install python3-torch), or no shmps module in this build");
    return;
  }
  const std::string py = python + " '" + example + "'";
  const TrainResult py_local = run_training(env + py + " --local --samples " + samples, "");
  add_train(r, "sparse-train.local.py", py_local, "ctr_torch.py --local (nn.EmbeddingBag(sparse=True), SGD)");
  const TrainResult py_one = launch(1, py, ctr_spec);
  add_train(r, "sparse-train.1.py", py_one, "1 PyTorch worker through shmps, ASP", &py_local, "local.py");
  const TrainResult py_two = launch(2, py, ctr_spec);
  add_train(r, "sparse-train.2.py", py_two, "2 PyTorch workers through shmps, ASP", &py_one, "1.py");
  const TrainResult hogwild = run_training(env + py + " --hogwild 2 --samples " + samples, "");
  add_train(r, "sparse-train.hogwild2.py", hogwild, "ctr_torch.py --hogwild 2: PyTorch Hogwild, 2 processes", &py_two,
            "2.py (so below 1: shmps is faster)");
}

}  // namespace

void run_sparse(const Config& cfg, Report& r) {
  const std::uint64_t batches = cfg.quick ? 20 : 500;
  std::vector<std::vector<std::uint64_t>> rows(batches);
  std::uint64_t total_rows = 0, widest = 0;
  for (std::uint64_t j = 0; j < batches; ++j) {
    rows[j] = batch_rows(j);
    total_rows += rows[j].size();
    widest = std::max<std::uint64_t>(widest, rows[j].size());
  }
  const double gb = static_cast<double>(total_rows * kDim * sizeof(float)) / 1e9;
  r.add("sparse.batch_rows", static_cast<double>(total_rows) / static_cast<double>(batches), "rows",
        "distinct rows per batch of 256 samples (docs/workloads.md §4: about 1,350)");

  Job job(table_job(""));
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
  std::vector<float> out(widest * kDim), grads(widest * kDim, 0.001f);
  Floats table(kRows * kDim, 0.5f);  // the limit's own table, in this process

  // Pull against a gather.
  std::vector<double> t_pull, t_gather;
  for (int rep = -1; rep < cfg.reps; ++rep) {
    double t0 = now_s();
    for (const auto& ids : rows) w.pull_rows("emb", ids, {out.data(), ids.size() * kDim});
    if (rep >= 0) t_pull.push_back(now_s() - t0);
    t0 = now_s();
    for (const auto& ids : rows)
      for (std::size_t k = 0; k < ids.size(); ++k)
        std::copy_n(table.data() + ids[k] * kDim, kDim, out.data() + k * kDim);
    if (rep >= 0) t_gather.push_back(now_s() - t0);
  }
  const double pull_rows_s = static_cast<double>(total_rows) / median(t_pull);
  const double gather_rows_s = static_cast<double>(total_rows) / median(t_gather);
  r.add("sparse-pull", pull_rows_s, "rows/s", "pull_rows of each batch's distinct rows, one worker");
  r.add("sparse-pull.gbs", gb / median(t_pull), "GB/s", "the same, in bytes of rows");
  r.add("sparse-pull.gather", gather_rows_s, "rows/s", "limit: a plain gather of the same rows, in this process");
  r.add("sparse-pull.ratio", pull_rows_s / gather_rows_s, "x", "sparse-pull / gather");

  // Push (until applied) against a scatter-add.
  // Every batch's rows pushed by `pusher`, until applied: the median time of cfg.reps passes.
  const auto time_pushes = [&](Worker& pusher) {
    std::vector<double> t;
    for (int rep = -1; rep < cfg.reps; ++rep) {
      const double t0 = now_s();
      std::uint64_t seq = 0;
      for (const auto& ids : rows) seq = pusher.push_rows("emb", ids, {grads.data(), ids.size() * kDim});
      pusher.wait_applied(seq);
      if (rep >= 0) t.push_back(now_s() - t0);
    }
    return median(t);
  };
  const double t_push = time_pushes(w);
  std::vector<double> t_scatter;
  for (int rep = -1; rep < cfg.reps; ++rep) {
    const double t0 = now_s();
    for (const auto& ids : rows)
      for (std::size_t k = 0; k < ids.size(); ++k) {
        float* p = table.data() + ids[k] * kDim;
        const float* g = grads.data() + k * kDim;
        for (std::uint64_t d = 0; d < kDim; ++d) p[d] -= 1e-6f * g[d];
      }
    if (rep >= 0) t_scatter.push_back(now_s() - t0);
  }
  const double push_rows_s = static_cast<double>(total_rows) / t_push;
  const double scatter_rows_s = static_cast<double>(total_rows) / median(t_scatter);
  r.add("sparse-push", push_rows_s, "rows/s", "push_rows of each batch's distinct rows until applied, one worker");
  r.add("sparse-push.gbs", gb / t_push, "GB/s", "the same, in bytes of gradient rows");
  r.add("sparse-push.scatter", scatter_rows_s, "rows/s", "limit: p[id] -= lr * g over the same rows, in this process");
  r.add("sparse-push.ratio", push_rows_s / scatter_rows_s, "x", "sparse-push / scatter-add");

  // One round's time against its distinct rows (spread over the table), and against the same
  // number of ids on one hot row.
  for (const std::uint64_t n : {std::uint64_t{64}, std::uint64_t{1024}, std::uint64_t{4096}, std::uint64_t{16384}}) {
    if (cfg.quick && n > 1024) break;
    std::vector<std::uint64_t> spread(n), hot(n, 0);
    for (std::uint64_t k = 0; k < n; ++k) spread[k] = (k * 2654435761ULL) % kRows;
    std::vector<float> g(n * kDim, 0.001f);
    for (const bool on_hot : {false, true}) {
      std::vector<double> t;
      for (int rep = -1; rep < cfg.reps; ++rep) {
        const double t0 = now_s();
        w.wait_applied(w.push_rows("emb", on_hot ? hot : spread, g));
        if (rep >= 0) t.push_back(now_s() - t0);
      }
      r.add("sparse-round." + std::string(on_hot ? "hot." : "") + std::to_string(n), median(t) * 1e6, "us",
            on_hot ? std::to_string(n) + " ids all on row 0, push to applied"
                   : std::to_string(n) + " distinct rows spread over the table, push to applied");
    }
  }
  w.leave();

  // The same pushes with the table's own optimizer, each in a fresh job of its own (SGD too, as
  // the base of the ratios: every job's table starts cold).
  double sgd_rows_s = 0;
  for (const std::string kind : {"sgd", "rowwise_adagrad", "adagrad", "adam"}) {
    Job own(table_job("optimizer = { kind = \"" + kind + "\", lr = 1e-6 }\n"));
    Worker pusher(WorkerOptions{.segment = own.name(), .rank = 0});
    const double rows_s = static_cast<double>(total_rows) / time_pushes(pusher);
    r.add("sparse-push." + kind, rows_s, "rows/s", "sparse-push with the table's own " + kind + ", a fresh job");
    if (kind == "sgd")
      sgd_rows_s = rows_s;
    else
      r.add("sparse-push." + kind + ".ratio", rows_s / sgd_rows_s, "x", "/ sparse-push.sgd");
    pusher.leave();
  }

  // Keys (keys = "u64"): the same rows as keys, pulled and pushed, in a job whose table holds
  // every key the passes touch (admitted in the warm-up pass), and in one of 16,384 slots, which
  // the passes churn through (a key evicted and admitted again all the time).
  for (const std::uint64_t slots : {kRows, std::uint64_t{16384}}) {
    const std::string name = slots == kRows ? "keyed" : "keyed.evicting";
    JobOptions options = table_job("keys = \"u64\"\n");
    const std::string rows_line = "rows = " + std::to_string(kRows) + "\n";
    options.extra_spec.replace(options.extra_spec.find(rows_line), rows_line.size(), "rows = " + std::to_string(slots) + "\n");
    Job keyed(options);
    Worker kw(WorkerOptions{.segment = keyed.name(), .rank = 0});
    const double push_s = static_cast<double>(total_rows) / time_pushes(kw);
    std::vector<double> t;
    for (int rep = -1; rep < cfg.reps; ++rep) {
      const double t0 = now_s();
      for (const auto& ids : rows) kw.pull_rows("emb", ids, {out.data(), ids.size() * kDim});
      if (rep >= 0) t.push_back(now_s() - t0);
    }
    const double pull_s = static_cast<double>(total_rows) / median(t);
    const std::string where = slots == kRows ? "a table that holds every key" : "16,384 slots, evicting";
    r.add("sparse-push." + name, push_s, "rows/s", "sparse-push with the ids as keys = \"u64\", " + where);
    r.add("sparse-push." + name + ".ratio", push_s / sgd_rows_s, "x", "/ sparse-push.sgd");
    r.add("sparse-pull." + name, pull_s, "rows/s", "sparse-pull of the keys, " + where);
    r.add("sparse-pull." + name + ".ratio", pull_s / pull_rows_s, "x", "/ sparse-pull");
    kw.leave();
  }
  run_sparse_train(cfg, r);
}

}  // namespace shmps::bench
