// Initial parameter values, from the model spec's initialisers.
#pragma once

#include <map>
#include <span>
#include <string>
#include <vector>

#include <shmps/server/model_spec.hpp>

namespace shmps::server {

// The values of the spec's pretrained parameters, read from their safetensors files.
struct PretrainedValues {
  // param name -> its values, row-major, exactly param.size() floats. Only parameters whose
  // init kind is pretrained are here.
  std::map<std::string, std::vector<float>> by_param;
};

// Loads every tensor that a Kind::pretrained init of `spec` asks for, reading each distinct file
// once (one at a time: peak memory is one whole file plus the values kept). Checks that each
// tensor exists, has dtype F32, exactly the parameter's shape and only finite values. Throws
// shmps::Error naming the parameter, the file and the problem, e.g.
//   param "fc1.weight": init from models/w.safetensors: tensor "fc1.weight" has shape
//   [256, 784], the spec says [128, 784]
// (a file that cannot be read or is not a valid safetensors file gives the reader's problem in
// place of the tensor's). Returns an empty PretrainedValues when no init is pretrained.
PretrainedValues load_pretrained(const ModelSpec& spec);

// Fills `values` (the whole parameter, row-major) as param.init says; for Kind::pretrained it
// copies pretrained.by_param[param.name] (from load_pretrained), and throws shmps::Error if that
// is missing or its size is not values.size().
void initialise(const ParamSpec& param, std::span<float> values, const PretrainedValues& pretrained);

// Fills `values` (the whole parameter, row-major) as `init` says. Deterministic and exact: the
// same spec gives the same bytes on every machine (see docs/workloads.md §2).
// Kind::pretrained needs the file's values: this overload throws shmps::Error for it (use the
// one above).
void initialise(const InitSpec& init, std::span<float> values);

}  // namespace shmps::server
