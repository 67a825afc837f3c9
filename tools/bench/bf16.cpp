// bf16: parameters whose values are stored in bf16 (dtype = "bf16") against the same model in
// float32, in this process (the shmps_server library driven one round at a time, as the apply
// group does), one apply thread: the model is cfg.params parameters of cfg.per_param elements.
//
//   bf16.<dtype>.pull        Worker::pull into a float32 buffer, the whole model (a bf16
//                            parameter's 2-byte values widened on the way)
//   bf16.bf16.pull-raw       Worker::pull into uint16: the stored values as they are
//   bf16.<dtype>.push        Worker::push of a whole-model float32 gradient into the ring
//   bf16.bf16.push-raw       Worker::push of the gradient as bf16 (std::uint16_t): widened to
//                            float32 straight into the ring record
//   bf16.<dtype>.apply       one apply round of that gradient, SGD and Adam: values read (widened),
//                            the float32 step, the new values rounded and narrowed, through the redo
//                            entry (a 2-byte parameter's slices always go in whole)
//
// Each in Gelem/s (elements of the model per second: the same work for either dtype), the median
// of cfg.reps, the dtypes timed in turns within each rep so that both see the same machine.
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

// The bench's job spec with every parameter's values in `dtype` ("f32": as it is).
std::string spec_with_dtype(const JobOptions& job, const std::string& name, const std::string& dtype) {
  std::string spec = job_spec(job, name);
  if (dtype == "f32") return spec;
  const std::string shape = "shape = [" + std::to_string(job.per_param) + "]\n";
  for (std::size_t at = spec.find(shape); at != std::string::npos; at = spec.find(shape, at + 1))
    spec.insert(at + shape.size(), "dtype = \"" + dtype + "\"\n");
  return spec;
}

struct Times {
  std::vector<double> pull, pull_raw, push, push_raw, apply;
};

// One rep of every figure for one dtype and optimizer, on a server of its own.
class Bench {
 public:
  Bench(const Config& cfg, const std::string& dtype, const std::string& optimizer) : cfg_(cfg), name_(job_name()) {
    const JobOptions job{.params = cfg.params,
                         .per_param = cfg.per_param,
                         .optimizer = optimizer,
                         .max_workers = 1,
                         .ring_bytes = (cfg.bytes() + (std::uint64_t{4} << 20)) / 64 * 64,
                         .threads = 1};
    server::ServerOptions options;
    options.spec = server::parse_model_spec(spec_with_dtype(job, name_, dtype), "<shmps-bench bf16>");
    options.remove_on_stop = true;
    server_ = std::make_unique<server::Server>(std::move(options));
    server_->start();
    worker_ = std::make_unique<Worker>(WorkerOptions{.segment = name_, .rank = 0});
    raw_ = worker_->params()[0].dtype != ValueDType::f32;
  }
  ~Bench() {
    worker_->leave();
    worker_.reset();
    server_.reset();
    shm::Segment::remove(name_);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  void rep(Times& t, bool record) {
    double t0 = now_s();
    for (std::size_t i = 0; i < cfg_.params; ++i)
      worker_->pull(Job::param(i), std::span<float>(values_.data() + i * cfg_.per_param, cfg_.per_param));
    double t1 = now_s();
    if (raw_)
      for (std::size_t i = 0; i < cfg_.params; ++i)
        worker_->pull(Job::param(i), std::span<std::uint16_t>(raw_values_.data() + i * cfg_.per_param, cfg_.per_param));
    double t2 = now_s();
    for (std::size_t i = 0; i < cfg_.params; ++i) worker_->push(Job::param(i), {grad_.data(), cfg_.per_param});
    double t3 = now_s();
    const std::uint64_t records = server_->apply_round();
    double t4 = now_s();
    if (records != cfg_.params)
      throw Error("bf16: a round applied " + std::to_string(records) + " records, not " + std::to_string(cfg_.params));
    keep(values_.data()[cfg_.floats() / 2]);
    double t5 = t4;
    if (raw_) {  // the same gradient as bf16 bits (0.5 is 0x3F00), applied untimed
      for (std::size_t i = 0; i < cfg_.params; ++i)
        worker_->push(Job::param(i), std::span<const std::uint16_t>(raw_grad_.data(), cfg_.per_param));
      t5 = now_s();
      if (server_->apply_round() != cfg_.params) throw Error("bf16: a round of bf16 gradients lost records");
    }
    if (!record) return;
    if (raw_) t.push_raw.push_back(t5 - t4);
    t.pull.push_back(t1 - t0);
    if (raw_) t.pull_raw.push_back(t2 - t1);
    t.push.push_back(t3 - t2);
    t.apply.push_back(t4 - t3);
  }

 private:
  const Config& cfg_;
  std::string name_;
  std::unique_ptr<server::Server> server_;
  std::unique_ptr<Worker> worker_;
  bool raw_ = false;
  Floats values_{cfg_.floats(), 0.0f};
  std::vector<std::uint16_t> raw_values_ = std::vector<std::uint16_t>(cfg_.floats());
  Floats grad_{cfg_.per_param, 0.5f};
  std::vector<std::uint16_t> raw_grad_ = std::vector<std::uint16_t>(cfg_.per_param, 0x3F00);
};

}  // namespace

void run_bf16(const Config& cfg, Report& report) {
  const double elems = static_cast<double>(cfg.floats()) / 1e9;
  const auto rate = [&](const std::vector<double>& t) { return elems / median(t); };
  for (const std::string optimizer : {"sgd", "adam"}) {
    Bench f32(cfg, "f32", optimizer), bf16(cfg, "bf16", optimizer);
    Times tf, tb;
    for (int rep = -1; rep < cfg.reps; ++rep) {  // rep -1 warms up
      f32.rep(tf, rep >= 0);
      bf16.rep(tb, rep >= 0);
    }
    const std::string what = " (" + std::to_string(cfg.params) + " x " + std::to_string(cfg.per_param) + " elements)";
    if (optimizer == "sgd") {  // the pulls and pushes do not depend on the optimizer: once
      report.add("bf16.f32.pull", rate(tf.pull), "Gelem/s", "Worker::pull of float32 values into floats" + what);
      report.add("bf16.bf16.pull", rate(tb.pull), "Gelem/s", "Worker::pull of bf16 values into floats (widened)" + what);
      report.add("bf16.bf16.pull-raw", rate(tb.pull_raw), "Gelem/s", "Worker::pull of bf16 values into uint16 (as stored)");
      report.add("bf16.f32.push", rate(tf.push), "Gelem/s", "Worker::push of a float32 gradient, float32 values");
      report.add("bf16.bf16.push", rate(tb.push), "Gelem/s", "Worker::push of a float32 gradient, bf16 values");
      report.add("bf16.bf16.push-raw", rate(tb.push_raw), "Gelem/s", "Worker::push of a bf16 gradient (widened), bf16 values");
    }
    report.add("bf16.f32.apply." + optimizer, rate(tf.apply), "Gelem/s",
               "one apply round, " + optimizer + ", float32 values, 1 thread");
    report.add("bf16.bf16.apply." + optimizer, rate(tb.apply), "Gelem/s",
               "one apply round, " + optimizer + ", bf16 values (widened, stepped, rounded), 1 thread");
  }
}

}  // namespace shmps::bench
