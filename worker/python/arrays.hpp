// How Python arrays reach the C++ worker: in place, through the buffer protocol, checked. A
// float32 array, a 2-byte one (a bf16 / fp16 parameter's stored values or gradient), or row ids;
// a torch tensor through tensor.detach().numpy(), which shares its memory. Anything else (another
// dtype, a layout that is not C-contiguous, a read-only array given as out=) is a shmps.Error
// saying what was given and what is needed: never converted, which would copy (and, for a pull,
// fill a temporary the caller never sees). Part of module.cpp (shmps._core); not installed.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/worker.hpp>

namespace shmps::python {

namespace py = pybind11;
using shmps::Error;

inline std::string shape_text(const std::vector<std::size_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// The object an array argument stands for: the object itself if it exports a buffer (a numpy
// array, a memoryview, ...), else a torch tensor's numpy view (shares its memory; a tensor on a
// GPU makes torch raise its own clear error).
template <class What>
py::buffer as_buffer(py::handle object, const What& what, const char* expected = "a float32 numpy array") {
  if (py::isinstance<py::buffer>(object)) return py::reinterpret_borrow<py::buffer>(object);
  if (py::hasattr(object, "detach") && py::hasattr(object, "numpy"))
    return object.attr("detach")().attr("numpy")().cast<py::buffer>();
  throw Error(what() + " must be " + expected + " (or a torch tensor on the CPU), got " +
              py::str(py::type::handle_of(object).attr("__name__")).cast<std::string>());
}

// Refuses a buffer that is not C-contiguous (its elements `itemsize` bytes each): shmps reads or
// writes it as one block. `why` says what shmps does with it.
template <class What>
void require_c_contiguous(const py::buffer_info& info, py::ssize_t itemsize, const What& what, const char* why) {
  py::ssize_t expected = itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    const auto i = static_cast<std::size_t>(d);
    if (info.shape[i] != 1 && info.strides[i] != expected)
      throw Error(what() + " must be C-contiguous (" + why + "); use numpy.ascontiguousarray(...) or "
                  "tensor.contiguous()");
    expected *= info.shape[i];
  }
}

// The float32 memory of a C-contiguous buffer, or a clear error naming what is wrong with it.
struct FloatView {
  py::buffer_info info;
  float* data = nullptr;
  std::size_t size = 0;
};

// `what()` names the argument in an error message; it is only called when there is one (a
// message built on every call would cost as much as a small pull).
template <class What>
FloatView float_view(py::handle object, bool writable, const What& what) {
  py::buffer buffer = as_buffer(object, what);
  FloatView v;
  try {
    v.info = buffer.request(writable);
  } catch (const py::error_already_set&) {
    throw Error(what() + " must be writeable (pull fills it in place); pass a writeable array or out=None");
  }
  if (v.info.itemsize != 4 || (v.info.format != "f" && v.info.format != "<f" && v.info.format != "=f"))
    throw Error(what() + " must have dtype float32, got format '" + v.info.format + "' (" +
                std::to_string(v.info.itemsize) + " bytes an element); convert it once with .astype(numpy.float32)"
                " outside the training loop, or allocate it as float32");
  require_c_contiguous(v.info, 4, what, "shmps copies it as one block");
  v.data = static_cast<float*>(v.info.ptr);
  v.size = static_cast<std::size_t>(v.info.size);
  return v;
}

// The 2-byte memory of a C-contiguous buffer for a raw pull (writable) or a 2-byte push of a
// bf16 / fp16 parameter: uint16 (bit patterns; int16 too for a pull), a torch.bfloat16 tensor
// for a bf16 parameter only (taken as its int16 view), or float16 for an fp16 parameter.
// Anything else is a clear error.
struct HalfView {
  py::buffer_info info;
  std::uint16_t* data = nullptr;
  std::size_t size = 0;
};

template <class What>
HalfView half_view(py::handle object, shmps::ValueDType dtype, const What& what, bool writable = true) {
  py::object holder = py::reinterpret_borrow<py::object>(object);
  const bool torch_bf16 =
      py::hasattr(object, "dtype") && py::str(object.attr("dtype")).cast<std::string>() == "torch.bfloat16";
  if (torch_bf16) {  // its bits are bfloat16: never taken for another dtype's
    if (dtype != shmps::ValueDType::bf16)
      throw Error(what() + " is a torch.bfloat16 tensor, but the parameter stores " +
                  (dtype == shmps::ValueDType::fp16 ? "float16" : "float32") +
                  " values: pass its own type (a torch.float16 tensor or a numpy float16 / uint16 array), or float32");
    holder = object.attr("view")(py::module_::import("torch").attr("int16"));
  }
  py::buffer buffer = as_buffer(holder, what, "a uint16 numpy array");
  HalfView v;
  try {
    v.info = buffer.request(writable);
  } catch (const py::error_already_set&) {
    throw Error(what() + " must be writeable (pull fills it in place); pass a writeable array or out=None");
  }
  std::string_view format = v.info.format;
  if (!format.empty() && (format[0] == '<' || format[0] == '=')) format.remove_prefix(1);
  // Bit patterns: uint16; int16 too for a pull's out (and a torch.bfloat16 tensor's own view),
  // but not as a gradient, where an int16 array is more likely integers than bits.
  const bool bits = format == "H" || (format == "h" && (torch_bf16 || writable));
  if (v.info.itemsize != 2 || !(bits || (format == "e" && dtype == shmps::ValueDType::fp16)))
    throw Error(what() + " must have dtype " +
                (dtype == shmps::ValueDType::fp16 ? "float16 or uint16" : "uint16 (bfloat16 bit patterns)") +
                " for the stored values, or float32 for converted ones; got format '" + v.info.format + "'");
  require_c_contiguous(v.info, 2, what, "shmps copies it as one block");
  v.data = static_cast<std::uint16_t*>(v.info.ptr);
  v.size = static_cast<std::size_t>(v.info.size);
  return v;
}

// Whether `out` (an array given to pull) has 2-byte elements: a raw pull of a bf16 / fp16 parameter.
inline bool two_byte_elements(py::handle out) {
  if (py::hasattr(out, "dtype") && py::str(out.attr("dtype")).cast<std::string>() == "torch.bfloat16") return true;
  if (py::hasattr(out, "itemsize")) return py::cast<py::ssize_t>(out.attr("itemsize")) == 2;  // numpy
  if (py::hasattr(out, "element_size")) return py::cast<py::ssize_t>(out.attr("element_size")()) == 2;  // torch
  return false;
}

// A 2-byte gradient given for a float32 parameter: said before the array is looked at further.
inline void refuse_two_bytes_for_f32(const shmps::ParamInfo& p, const char* call) {
  if (p.dtype == shmps::ValueDType::f32)
    throw Error(std::string(call) + "('" + p.name + "', ...): the gradient has 2-byte elements, but '" + p.name +
                "' stores float32 values (dtype f32): pass a float32 gradient (tensor.float()); nothing was pushed");
}

// The row ids of a C-contiguous int64 or uint64 buffer, read in place as uint64 (no copy): an
// int64 array is checked for negative ids first (a read), then reinterpreted, which keeps the
// value of every non-negative id. Any shape, taken flat in C order: a 1-D array, or a sparse
// gradient's indices() of shape (1, n). `keys`: a table with keys = "u64", whose ids are any
// 64-bit keys: an int64 array's values are taken as their bits (a negative one included).
struct IdsView {
  py::buffer_info info;
  const std::uint64_t* data = nullptr;
  std::size_t size = 0;
};

template <class What>
IdsView ids_view(py::handle object, const What& what, bool keys = false) {
  py::buffer buffer = as_buffer(object, what, "an int64 or uint64 numpy array");
  IdsView v;
  v.info = buffer.request(false);
  std::string_view format = v.info.format;
  if (!format.empty() && (format[0] == '@' || format[0] == '=' || format[0] == '<')) format.remove_prefix(1);
  const bool is_signed = format == "q" || format == "l";
  const bool is_unsigned = format == "Q" || format == "L";
  if (v.info.itemsize != 8 || !(is_signed || is_unsigned))
    throw Error(what() + " must have dtype int64 or uint64, got format '" + v.info.format + "' (" +
                std::to_string(v.info.itemsize) + " bytes an element); build the ids as int64 (torch's "
                "default) or uint64 outside the training loop");
  require_c_contiguous(v.info, 8, what, "shmps reads the ids in place, never a copy");
  v.size = static_cast<std::size_t>(v.info.size);
  if (is_signed && !keys) {
    const auto* s = static_cast<const std::int64_t*>(v.info.ptr);
    for (std::size_t k = 0; k < v.size; ++k)
      if (s[k] < 0)
        throw Error(what() + " holds a negative id, " + std::to_string(s[k]) + " at position " + std::to_string(k) +
                    "; row ids are in [0, rows)");
  }
  // int64 and uint64 may alias each other; a non-negative int64 is the same uint64.
  v.data = static_cast<const std::uint64_t*>(v.info.ptr);
  return v;
}

}  // namespace shmps::python
