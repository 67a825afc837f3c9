// shmps._core: the C++ worker library (<shmps/worker.hpp>) for Python, with pybind11.
//
//   import shmps
//   with shmps.Worker("mlp", rank=0) as w:
//       values, version = w.pull("fc1.weight")          # a new float32 array
//       w.pull("fc1.weight", out=values)                # into an existing one, no allocation
//       view = w.view("fc1.weight")                     # read-only array over the segment, no copy
//       seq = w.push("fc1.weight", grad)                # grad: C-contiguous float32, not copied
//       w.wait_applied(seq)
//       rows, version = w.pull_rows("emb", ids)         # a table's rows ids[k]: float32 (len(ids), dim)
//       seq = w.push_rows("emb", ids, grads)            # ids int64/uint64, grads float32 (len(ids), dim)
//
// What a Python user relies on, and how it is kept:
// - No copy beyond the C++ one. An array given to pull(out=) or push() is used in place
//   through the buffer protocol; one of another dtype or layout is refused (never converted,
//   which would copy, and for pull would fill a temporary the caller never sees). A torch tensor
//   is taken through tensor.detach().numpy(), which shares its memory.
// - The GIL is released for everything that copies, waits or touches the segment, so other
//   Python threads run meanwhile. One Worker is one thread's in C++; here a mutex per Worker,
//   taken only after the GIL is released (never the other way round), makes concurrent calls
//   from several Python threads safe, one after the other.
// - Every shmps::Error becomes shmps.Error with the same message. Arguments that are wrong
//   for shmps (an array of the wrong size, dtype or layout) raise shmps.Error too, saying what
//   was given and what is needed; like every failed call they change nothing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include <shmps/worker.hpp>

#include "arrays.hpp"

namespace py = pybind11;

namespace {

using shmps::Error;
using namespace shmps::python;

// A parameter as params() describes it. A table ([[table]] in the spec) has rows and dim
// (its shape is (rows, dim)); a dense parameter has 0 and 0.
struct Param {
  std::string name;
  py::tuple shape;
  std::size_t size;
  std::size_t rows = 0;
  std::size_t dim = 0;
  bool init_put = false;
  shmps::ValueDType dtype = shmps::ValueDType::f32;
  bool keyed = false;
};

// A parameter's stored type: the numpy dtype of view() and of a raw pull (float32; float16 for
// fp16; uint16 bit patterns for bf16, which numpy has no type for), and its name.
py::dtype numpy_dtype(shmps::ValueDType d) {
  switch (d) {
    case shmps::ValueDType::f32: return py::dtype::of<float>();
    case shmps::ValueDType::bf16: return py::dtype::of<std::uint16_t>();
    case shmps::ValueDType::fp16: return py::dtype("float16");
  }
  return py::dtype::of<float>();
}
const char* dtype_name(shmps::ValueDType d) {
  switch (d) {
    case shmps::ValueDType::f32: return "float32";
    case shmps::ValueDType::bf16: return "bfloat16";
    case shmps::ValueDType::fp16: return "float16";
  }
  return "?";
}

// The Worker library's interrupt check (set_interrupt_check): runs Python's signal handlers, so
// that Ctrl-C interrupts any wait. Taking the GIL here is safe: no thread waits for a Worker's
// mutex while it holds the GIL (see the top of this file). The handler's exception stays set in
// this thread and is raised by PyWorker::unlocked; in other threads than the main one Python runs
// no handlers, and this returns false.
bool python_signal_pending() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// One Worker and the mutex that serialises the Python threads using it.
class PyWorker {
 public:
  PyWorker(const std::optional<std::string>& segment, int rank, double timeout_s) {
    if (!(timeout_s > 0)) throw Error("timeout must be positive (seconds), got " + std::to_string(timeout_s));
    shmps::WorkerOptions options{.segment = segment.value_or(""),
                                 .rank = rank,
                                 .timeout = std::chrono::milliseconds(static_cast<std::int64_t>(timeout_s * 1000))};
    try {
      py::gil_scoped_release unlocked;  // attaching may wait for the segment to become ready
      worker_.emplace(std::move(options));
    } catch (const shmps::Interrupted&) {
      if (PyErr_Occurred() != nullptr) throw py::error_already_set();
      throw;
    }
  }

  // Runs `f(worker)` with the GIL released and this Worker's mutex held. A wait that Python's
  // signal handlers interrupted (python_signal_pending) raises what they raised, KeyboardInterrupt
  // for Ctrl-C, once the GIL is back; so does a call that returned normally with a handler's
  // exception pending (leave() ends its work whatever a wait says).
  template <class F>
  auto unlocked(F&& f) {
    // A signal handler that the interrupt check ran on this thread, calling this Worker again,
    // would lock the mutex this thread holds: refuse it rather than deadlock.
    if (owner_.load() == std::this_thread::get_id())
      throw Error("a shmps.Worker call from a Python signal handler that ran while the same worker waited (its "
                  "waits run Python's handlers, so that Ctrl-C works): call the worker after the wait instead, "
                  "e.g. set a flag in the handler");
    const auto call = [&] {
      py::gil_scoped_release release;
      std::lock_guard lock(mutex_);
      const Owner owned(owner_);
      return f(*worker_);
    };
    try {
      if constexpr (std::is_void_v<std::invoke_result_t<F&, shmps::Worker&>>) {
        call();
        raise_pending();
      } else {
        auto result = call();
        raise_pending();
        return result;
      }
    } catch (const shmps::Interrupted&) {
      raise_pending();
      throw;
    }
  }
  // For what does not change once attached (rank, segment, generation, the parameters): no lock.
  shmps::Worker& local() { return *worker_; }

  const shmps::ParamInfo& param(const std::string& name) { return worker_->param(name); }

  // pull(), push() and put() are for dense parameters; a table's name is refused here, before
  // anything is allocated or checked against its (rows, dim) size.
  static void refuse_table(const shmps::ParamInfo& p, const char* call) {
    if (p.is_table())
      throw Error(std::string(call) + "('" + p.name + "'): '" + p.name + "' is a table (" + std::to_string(p.rows) +
                  " rows of " + std::to_string(p.dim) + "), read and written by row: use pull_rows('" + p.name +
                  "', ids) and push_rows('" + p.name + "', ids, grads)");
  }
  // pull_rows() and push_rows() are for tables.
  static void require_table(const shmps::ParamInfo& p, const char* call) {
    if (!p.is_table())
      throw Error(std::string(call) + "('" + p.name + "'): '" + p.name + "' is a dense parameter " +
                  shape_text(p.shape) + ", not a table; use pull('" + p.name + "') and push('" + p.name + "', grad)");
  }

  py::tuple pull(const std::string& name, py::object out, std::optional<std::size_t> offset, std::uint64_t min_version) {
    const shmps::ParamInfo& p = param(name);
    refuse_table(p, "pull");
    const std::size_t first = offset.value_or(0);
    if (first > p.size)
      throw Error("pull('" + name + "'): offset " + std::to_string(first) + " is past its " + std::to_string(p.size) +
                  " elements");
    if (!out.is_none() && p.dtype != shmps::ValueDType::f32 && two_byte_elements(out)) {
      // A bf16 / fp16 parameter's stored values as they are (Worker::pull into 2-byte elements).
      const HalfView half = half_view(out, p.dtype, [&] { return "pull('" + name + "', out=...): out"; });
      if (!offset && half.size != p.size)
        throw Error("pull('" + name + "', out=...): out has " + std::to_string(half.size) + " elements, the parameter " +
                    std::to_string(p.size) + " " + shape_text(p.shape) +
                    "; pass an array of that size, or offset= to pull a range into it");
      const std::uint64_t version = unlocked(
          [&](shmps::Worker& w) { return w.pull(name, first, std::span<std::uint16_t>(half.data, half.size), min_version); });
      return py::make_tuple(out, version);
    }
    py::object result;
    float* data = nullptr;
    std::size_t count = 0;
    std::optional<FloatView> view;
    if (out.is_none()) {
      count = p.size - first;
      py::array_t<float> fresh = offset ? py::array_t<float>(static_cast<py::ssize_t>(count))
                                        : py::array_t<float>(std::vector<py::ssize_t>(p.shape.begin(), p.shape.end()));
      data = fresh.mutable_data();
      result = fresh;
    } else {
      view.emplace(float_view(out, true, [&] { return "pull('" + name + "', out=...): out"; }));
      count = view->size;
      if (!offset && count != p.size)
        throw Error("pull('" + name + "', out=...): out has " + std::to_string(count) + " elements, the parameter " +
                    std::to_string(p.size) + " " + shape_text(p.shape) +
                    "; pass an array of that size, or offset= to pull a range into it");
      data = view->data;
      result = out;
    }
    const std::uint64_t version =
        unlocked([&](shmps::Worker& w) { return w.pull(name, first, std::span<float>(data, count), min_version); });
    return py::make_tuple(result, version);
  }

  std::uint64_t push(const std::string& name, py::handle grad, std::optional<std::size_t> offset) {
    const shmps::ParamInfo& p = param(name);
    refuse_table(p, "push");
    if (two_byte_elements(grad)) {  // a bf16 / fp16 parameter's gradient in its own type
      refuse_two_bytes_for_f32(p, "push");
      const HalfView half = half_view(grad, p.dtype, [&] { return "push('" + name + "', grad): grad"; }, false);
      if (!offset && half.size != p.size)
        throw Error("push('" + name + "', grad): grad has " + std::to_string(half.size) + " elements, the parameter " +
                    std::to_string(p.size) + " " + shape_text(p.shape) +
                    "; pass a gradient of that size, or offset= to push a range");
      const std::span<const std::uint16_t> bits(half.data, half.size);
      return unlocked([&](shmps::Worker& w) { return w.push(name, offset.value_or(0), bits); });
    }
    const FloatView view = float_view(grad, false, [&] { return "push('" + name + "', grad): grad"; });
    if (!offset && view.size != p.size)
      throw Error("push('" + name + "', grad): grad has " + std::to_string(view.size) + " elements, the parameter " +
                  std::to_string(p.size) + " " + shape_text(p.shape) +
                  "; pass a gradient of that size, or offset= to push a range");
    const std::span<const float> values(view.data, view.size);
    return unlocked([&](shmps::Worker& w) { return w.push(name, offset.value_or(0), values); });
  }

  // A table's rows ids[k] into a new float32 array (len(ids), dim), or into `out` in place.
  py::tuple pull_rows(const std::string& name, py::handle ids, py::object out) {
    const shmps::ParamInfo& p = param(name);
    require_table(p, "pull_rows");
    const IdsView id = ids_view(ids, [&] { return "pull_rows('" + name + "', ids): ids"; }, p.keyed);
    const std::size_t count = id.size * p.dim;
    const auto wrong_size = [&](std::size_t size) {
      return Error("pull_rows('" + name + "', ids, out=...): out has " + std::to_string(size) + " elements, " +
                   std::to_string(id.size) + " rows of " + std::to_string(p.dim) + " need " + std::to_string(count) +
                   "; pass an array of shape (len(ids), " + std::to_string(p.dim) + ")");
    };
    const std::span<const std::uint64_t> rows(id.data, id.size);
    if (!out.is_none() && two_byte_elements(out)) {  // a bf16 / fp16 table's stored values, as they are
      if (p.dtype == shmps::ValueDType::f32)
        throw Error("pull_rows('" + name + "', ids, out=...): out has 2-byte elements, but '" + name +
                    "' stores float32 values (dtype f32): pass a float32 out, or none");
      const HalfView half = half_view(out, p.dtype, [&] { return "pull_rows('" + name + "', ids, out=...): out"; });
      if (half.size != count) throw wrong_size(half.size);
      const std::uint64_t version = unlocked(
          [&](shmps::Worker& w) { return w.pull_rows(name, rows, std::span<std::uint16_t>(half.data, count)); });
      return py::make_tuple(out, version);
    }
    py::object result;
    float* data = nullptr;
    std::optional<FloatView> view;
    if (out.is_none()) {
      py::array_t<float> fresh({static_cast<py::ssize_t>(id.size), static_cast<py::ssize_t>(p.dim)});
      data = fresh.mutable_data();
      result = fresh;
    } else {
      view.emplace(float_view(out, true, [&] { return "pull_rows('" + name + "', ids, out=...): out"; }));
      if (view->size != count) throw wrong_size(view->size);
      data = view->data;
      result = out;
    }
    const std::uint64_t version =
        unlocked([&](shmps::Worker& w) { return w.pull_rows(name, rows, std::span<float>(data, count)); });
    return py::make_tuple(result, version);
  }

  // Gradient rows grads[k] for rows ids[k], as one record.
  std::uint64_t push_rows(const std::string& name, py::handle ids, py::handle grads) {
    const shmps::ParamInfo& p = param(name);
    require_table(p, "push_rows");
    const IdsView id = ids_view(ids, [&] { return "push_rows('" + name + "', ids, grads): ids"; }, p.keyed);
    const auto what = [&] { return "push_rows('" + name + "', ids, grads): grads"; };
    const auto check_rows = [&](const py::buffer_info& info, std::size_t size) {
      const bool rows_wrong = info.ndim == 2 && static_cast<std::size_t>(info.shape[1]) != p.dim;
      if (rows_wrong || size != id.size * p.dim)
        throw Error("push_rows('" + name + "', ids, grads): grads has shape " +
                    shape_text(std::vector<std::size_t>(info.shape.begin(), info.shape.end())) + " for " +
                    std::to_string(id.size) + " ids; the table's rows have " + std::to_string(p.dim) +
                    " values, so grads must be (" + std::to_string(id.size) + ", " + std::to_string(p.dim) +
                    ") or flat with " + std::to_string(id.size * p.dim) + " elements");
    };
    const std::span<const std::uint64_t> rows(id.data, id.size);
    if (two_byte_elements(grads)) {  // a bf16 / fp16 table's gradient rows in its own type
      refuse_two_bytes_for_f32(p, "push_rows");
      const HalfView half = half_view(grads, p.dtype, what, false);
      check_rows(half.info, half.size);
      const std::span<const std::uint16_t> bits(half.data, half.size);
      return unlocked([&](shmps::Worker& w) { return w.push_rows(name, rows, bits); });
    }
    const FloatView g = float_view(grads, false, what);
    check_rows(g.info, g.size);
    const std::span<const float> values(g.data, g.size);
    return unlocked([&](shmps::Worker& w) { return w.push_rows(name, rows, values); });
  }

  void put(const std::string& name, py::handle values, std::optional<std::size_t> offset) {
    const shmps::ParamInfo& p = param(name);
    const FloatView view = float_view(values, false, [&] { return "put('" + name + "', values): values"; });
    if (!offset && view.size != p.size)
      throw Error("put('" + name + "', values): values has " + std::to_string(view.size) + " elements, the parameter " +
                  std::to_string(p.size) + " " + shape_text(p.shape) + "; pass values of that size, or offset= to put a range");
    const std::span<const float> data(view.data, view.size);
    unlocked([&](shmps::Worker& w) { w.put(name, offset.value_or(0), data); });
  }

  // A read-only numpy array over the parameter's values in the segment (Worker::view): no copy.
  // Its base is the Python Worker object, so the mapping outlives every array taken from it.
  static py::array view(py::object self, const std::string& name, std::optional<std::size_t> offset,
                        std::optional<std::size_t> count) {
    PyWorker& me = self.cast<PyWorker&>();
    const shmps::ParamInfo& p = me.param(name);
    const std::size_t first = offset.value_or(0);
    if (!count && first > p.size)
      throw Error("view('" + name + "'): offset " + std::to_string(first) + " is past its " + std::to_string(p.size) +
                  " elements");
    const std::size_t n = count.value_or(p.size - first);
    // A bf16 / fp16 parameter: its stored 2-byte values (uint16 bit patterns for bf16, float16).
    const void* values = me.unlocked([&](shmps::Worker& w) -> const void* {
      if (p.dtype == shmps::ValueDType::f32) return w.view(name, first, n).data();
      return w.view_raw(name, first, n).data();
    });
    std::vector<py::ssize_t> shape;
    if (offset || count)
      shape.push_back(static_cast<py::ssize_t>(n));
    else
      shape.assign(p.shape.begin(), p.shape.end());
    // pybind11 marks an array over foreign memory writeable; its base (self) keeps it alive.
    py::array array(numpy_dtype(p.dtype), shape, {}, values, self);
    array.attr("setflags")(py::arg("write") = false);
    return array;
  }

  py::dict pull_all() {
    py::dict all;
    for (const shmps::ParamInfo& p : worker_->params()) {
      if (p.keyed) continue;  // keys = "u64": no whole to pull, only keys (pull_rows)
      if (p.is_table()) {  // every row, pulled by row: (rows, dim)
        py::array_t<std::uint64_t> ids(static_cast<py::ssize_t>(p.rows));
        std::uint64_t* id = ids.mutable_data();
        for (std::size_t r = 0; r < p.rows; ++r) id[r] = r;
        all[py::str(p.name)] = pull_rows(p.name, ids, py::none())[0];
        continue;
      }
      py::tuple pulled = pull(p.name, py::none(), std::nullopt, 0);
      all[py::str(p.name)] = pulled[0];
    }
    return all;
  }

  void save_state(const py::bytes& state) {
    const std::string_view bytes = state;  // pybind11 views the bytes object's own memory
    const std::span<const std::byte> span(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size());
    unlocked([&](shmps::Worker& w) { w.save_state(span); });
  }

  py::bytes load_state() {
    const std::vector<std::byte> state = unlocked([](shmps::Worker& w) { return w.load_state(); });
    return py::bytes(reinterpret_cast<const char*>(state.data()), state.size());
  }

 private:
  // The thread holding mutex_ while it runs a call, for unlocked()'s re-entry check.
  struct Owner {
    explicit Owner(std::atomic<std::thread::id>& o) : owner(o) { owner.store(std::this_thread::get_id()); }
    ~Owner() { owner.store(std::thread::id{}); }
    Owner(const Owner&) = delete;
    Owner& operator=(const Owner&) = delete;
    std::atomic<std::thread::id>& owner;
  };
  static void raise_pending() {
    if (PyErr_Occurred() != nullptr) throw py::error_already_set();
  }

  std::optional<shmps::Worker> worker_;
  std::mutex mutex_;
  std::atomic<std::thread::id> owner_{};
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "shmps: join a shmps job (a shared-memory parameter server) as a worker. See help(shmps.Worker).";
  shmps::set_interrupt_check(&python_signal_pending);  // Ctrl-C interrupts any wait

  // shmps.Error, an Exception carrying the C++ message unchanged.
  static py::exception<Error> error(m, "Error");
  error.attr("__module__") = "shmps";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(error.ptr(), e.what());
    }
  });

  py::class_<Param>(m, "Param", "A parameter of the model: name, shape, dtype (how the segment stores it: "
                                 "dtype_name) and size; a table also rows and dim (is_table).")
      .def_readonly("name", &Param::name)
      .def_readonly("shape", &Param::shape)
      .def_readonly("size", &Param::size, "number of elements")
      .def_readonly("rows", &Param::rows, "a table's number of rows; 0 for a dense parameter")
      .def_readonly("dim", &Param::dim, "the values in each row of a table; 0 for a dense parameter")
      .def_property_readonly("is_table", [](const Param& p) { return p.dim != 0; },
                             "True for a table ([[table]] in the spec: pull_rows/push_rows), False for a dense parameter")
      .def_readonly("keyed", &Param::keyed,
                    "True for a table with keys = \"u64\": its ids are any 64-bit keys (int64 bits or uint64), and "
                    "rows is how many it holds at once")
      .def_readonly("init_put", &Param::init_put,
                    "True when the spec says init = \"put\": a worker puts the first values, pulls wait for it")
      .def_property_readonly("dtype", [](const Param& p) { return numpy_dtype(p.dtype); },
                             "the numpy dtype of view() and of a raw pull(out=...): float32, float16 (dtype \"fp16\"), "
                             "or uint16 for dtype \"bf16\" (numpy has no bfloat16: the arrays hold its bit patterns; "
                             "torch.from_numpy(a.view(numpy.int16)).view(torch.bfloat16) reads them as bfloat16)")
      .def_property_readonly("dtype_name", [](const Param& p) { return dtype_name(p.dtype); },
                             "how the segment stores the values: 'float32', 'bfloat16' or 'float16'")
      .def("__repr__", [](const Param& p) {
        return "Param(name='" + p.name + "', shape=" + py::repr(p.shape).cast<std::string>() + ", dtype=" +
               dtype_name(p.dtype) + (p.dim != 0 ? ", table)" : ")");
      });

  py::class_<PyWorker>(m, "Worker", R"(A worker of a shmps job: a process that pulls parameters and pushes gradients.

Worker(segment=None, rank=-1, timeout=30.0)
  segment  the job's segment name; None: $SHMPS_SEGMENT (set by shmps-launch)
  rank     the worker slot to take; -1: $SHMPS_RANK if set, else the first free slot.
           A slot whose previous process died is taken over: load_state() gives what it
           committed last, and published() counts its pushes.
  timeout  seconds a call may wait for the server (full ring, wait_applied, a barrier)
           before it raises shmps.Error

A worker is a context manager: `with shmps.Worker("mlp") as w:` leaves the job at the end.
Every error is a shmps.Error whose message says what was wrong and what to do; a call that
fails changes nothing in the job.)")
      .def(py::init<const std::optional<std::string>&, int, double>(), py::arg("segment") = py::none(),
           py::arg("rank") = -1, py::arg("timeout") = 30.0)
      .def_property_readonly("rank", [](PyWorker& w) { return w.local().rank(); })
      .def_property_readonly("segment", [](PyWorker& w) { return w.local().segment(); })
      .def_property_readonly("generation", [](PyWorker& w) { return w.local().generation(); },
                             "1 for the first process that took this slot, +1 for every restart")
      .def_property_readonly("consistency", [](PyWorker& w) { return w.unlocked([](shmps::Worker& x) { return x.consistency(); }); },
                             "the job's consistency model now: 'asp', 'bsp' or 'ssp:N'")
      .def_property_readonly("current_clock", [](PyWorker& w) { return w.unlocked([](shmps::Worker& x) { return x.current_clock(); }); },
                             "the step this worker is in")
      .def("params",
           [](PyWorker& w) {
             py::list list;
             for (const shmps::ParamInfo& p : w.local().params()) {
               py::tuple shape(p.shape.size());
               for (std::size_t i = 0; i < p.shape.size(); ++i) shape[i] = p.shape[i];
               list.append(Param{p.name, shape, p.size, p.rows, p.dim, p.init_put, p.dtype, p.keyed});
             }
             return list;
           },
           "The model's parameters, in the segment's order: a list of Param (name, shape, dtype, size; rows, dim "
           "and is_table for a table).")
      .def("pull", &PyWorker::pull, py::arg("name"), py::arg("out") = py::none(), py::arg("offset") = py::none(),
           py::arg("min_version") = 0,
           R"(Pull a parameter: returns (array, version).

out=None: a new float32 array of the parameter's shape. out=ARRAY: filled in place and returned
(a C-contiguous float32 numpy array, or a CPU torch tensor, of the parameter's size; with offset=K
the elements K..K+out.size-1). A bf16 or fp16 parameter (Param.dtype_name) is converted into
float32 exactly; or, given out of 2-byte elements (uint16 or int16; float16 for fp16; a
torch.bfloat16 tensor for bf16), its stored values are copied as they are (half the bytes). Each slice is copied whole from one version; version is the update
count of the least-updated slice. Waits first as the consistency model requires (BSP: until the
previous step is applied; SSP: within the staleness bound). min_version=N (get by version): then
waits, bounded by the worker's timeout, until every slice of the range has had N updates. The GIL
is released while it waits and copies.)")
      .def("view", &PyWorker::view, py::arg("name"), py::arg("offset") = py::none(), py::arg("count") = py::none(),
           R"(A read-only numpy array over the parameter's values in shared memory: no copy.

Of the parameter's shape; with offset=K (and count=N, default: the rest) a 1-D range. Waits
first exactly as pull() does (BSP: until the previous step is applied; SSP: the bound) and
counts as a pull. In BSP the values are a consistent snapshot until this worker's next clock();
in ASP and SSP the server keeps writing under it (each float whole, a range may be mid-update).
Call view() again each step: that call is the wait, and it returns the same memory. The array
is not writeable (never write to the server's values) and keeps this Worker's mapping alive.
For torch: torch.from_numpy(a) shares it but warns that it is not writeable; see docs/python.md.
Its dtype is the stored one (Param.dtype): float32; float16 for a parameter of dtype fp16;
uint16 bit patterns for bf16, read as bfloat16 with
torch.from_numpy(a.view(numpy.int16)).view(torch.bfloat16) (torch.from_numpy takes no uint16).)")
      .def("pull_all", &PyWorker::pull_all,
           "Pull every parameter: a dict name -> new float32 array (a table's every row, (rows, dim); a table "
           "with keys = \"u64\" has no whole and is left out: pull its keys' rows with pull_rows).")
      .def("pull_rows", &PyWorker::pull_rows, py::arg("name"), py::arg("ids"), py::arg("out") = py::none(),
           R"(Pull rows of a table: returns (rows, version).

ids: the row numbers, a C-contiguous int64 or uint64 numpy array (or CPU torch tensor), read in
place (any shape, taken flat; a negative int64 id raises shmps.Error). out=None: a new float32
array of shape (len(ids), dim), row k holding row ids[k]; out=ARRAY: filled in place and returned
(C-contiguous float32 of len(ids)*dim elements; a bf16 / fp16 table's rows are widened exactly).
A bf16 / fp16 table's stored values as they are: out= a uint16 array (float16 for fp16) or a
torch.bfloat16 tensor. An id may repeat. Each row is copied whole from
one version; version is the update count of the least-updated slice seen. Waits first as pull()
does for the consistency model. The GIL is released meanwhile.)")
      .def("push_rows", &PyWorker::push_rows, py::arg("name"), py::arg("ids"), py::arg("grads"),
           R"(Push gradient rows of a table: returns the sequence number.

ids: as pull_rows (int64 or uint64, C-contiguous, read in place). grads: C-contiguous float32 of
shape (len(ids), dim), or flat with len(ids)*dim elements; row k is the gradient of row ids[k].
A bf16 / fp16 table also takes them in its own type, as push() does. An id may repeat: the server sums its rows. One record, all-or-nothing: an id out of range, NaN
or Inf raises shmps.Error and pushes nothing; it must fit one ring record (half the ring), so
split a bigger push. A PyTorch sparse gradient goes as it is:
    g = emb.weight.grad.coalesce(); w.push_rows("emb", g.indices()[0], g.values())
The GIL is released meanwhile.)")
      .def("push", &PyWorker::push, py::arg("name"), py::arg("grad"), py::arg("offset") = py::none(),
           R"(Push a gradient: returns its sequence number.

grad: a C-contiguous float32 numpy array (or CPU torch tensor) of the parameter's size, or with
offset=K a range starting at element K. It is read in place: the only copy is the one into this
worker's ring. A bf16 / fp16 parameter also takes its gradient in its own type: a torch.bfloat16
or float16 tensor, a numpy float16 (fp16) or uint16 array (the stored type's bits), widened
exactly to float32 on the way into the ring. All-or-nothing; a gradient holding NaN or Inf is refused (shmps.Error) and
nothing is pushed. Waits while the ring is full. The GIL is released meanwhile.)")
      .def("put", &PyWorker::put, py::arg("name"), py::arg("values"), py::arg("offset") = py::none(),
           R"(Put a parameter's values (SINGA's Put), as rank 0 sets a freshly initialised model.

values: a C-contiguous float32 numpy array (or CPU torch tensor) of the parameter's size, or with
offset=K a range starting at element K. Allowed until the parameter's first optimizer update,
for the first worker whose put the server applies (that rank may put it again before the first
update). Returns once applied; raises shmps.Error saying why if the server refused it, and for
NaN or Inf (nothing is put). A spec's init = "put" makes pulls wait for it. The GIL is released
meanwhile.)")
      .def("is_put", [](PyWorker& w, const std::string& name) { return w.local().is_put(name); }, py::arg("name"),
           "Whether every slice of the parameter has been put (always True for one that is not init = \"put\"). "
           "Does not wait.")
      .def("put_rank", [](PyWorker& w, const std::string& name) { return w.local().put_rank(name); }, py::arg("name"),
           "The rank whose put of the parameter the server applied first, or -1 if none yet.")
      .def("wait_applied", [](PyWorker& w, std::uint64_t seq) { w.unlocked([&](shmps::Worker& x) { x.wait_applied(seq); }); },
           py::arg("seq"), "Block until the server has applied every push up to sequence number seq.")
      .def("wait_for_workers",
           [](PyWorker& w, std::size_t count, std::optional<double> timeout) {
             if (timeout && !(*timeout > 0 && *timeout < 1e9))
               throw Error("wait_for_workers: timeout must be positive and finite (seconds), got " +
                           std::to_string(*timeout));
             w.unlocked([&](shmps::Worker& x) {
               if (timeout)
                 x.wait_for_workers(count, std::chrono::milliseconds(static_cast<std::int64_t>(*timeout * 1000.0)));
               else
                 x.wait_for_workers(count);
             });
           },
           py::arg("count"), py::arg("timeout") = py::none(),
           "Start barrier, called by every worker before its first pull or push: block until worker slots "
           "0..count-1 are each held by a live, admitted process (or one that left after ending a step at or past "
           "this one's), so that in BSP every worker is in step 0 however late it starts; raises after timeout "
           "seconds (default: the worker's) naming the ranks still missing.")
      .def("clock", [](PyWorker& w) { return w.unlocked([](shmps::Worker& x) { return x.clock(); }); },
           "End this worker's step (committing the state given to save_state with it); returns the new clock.")
      .def("save_state", &PyWorker::save_state, py::arg("state"),
           "Stage up to 1024 bytes of resume state (a data cursor); the next clock() commits them with the step.")
      .def("load_state", &PyWorker::load_state,
           "The resume state this slot committed last, by this process or an earlier one (b'' if none).")
      .def("published", [](PyWorker& w) { return w.unlocked([](shmps::Worker& x) { return x.published(); }); },
           "Pushes this slot committed, over all its generations.")
      .def("applied", [](PyWorker& w) { return w.unlocked([](shmps::Worker& x) { return x.applied(); }); }, "Pushes of this slot the server has applied.")
      .def("leave", [](PyWorker& w) { w.unlocked([](shmps::Worker& x) { x.leave(); }); },
           "Leave the job: end the current step if anything was pushed in it and free the slot. Idempotent.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](PyWorker& w, py::handle, py::handle, py::handle) {
             w.unlocked([](shmps::Worker& x) { x.leave(); });
             return false;
           })
      .def("__repr__", [](PyWorker& w) {
        return "shmps.Worker(segment='" + w.local().segment() + "', rank=" + std::to_string(w.local().rank()) +
               ", generation=" + std::to_string(w.local().generation()) + ")";
      });
}
