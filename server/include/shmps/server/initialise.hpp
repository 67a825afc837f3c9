// Initial parameter values, from the model spec's initialisers.
#pragma once

#include <span>

#include <shmps/server/model_spec.hpp>

namespace shmps::server {

// Fills `values` (the whole parameter, row-major) as `init` says. Deterministic and exact: the
// same spec gives the same bytes on every machine (see ../shared/workloads/README.md §2).
void initialise(const InitSpec& init, std::span<float> values);

}  // namespace shmps::server
