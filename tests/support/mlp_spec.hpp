// The reference MLP of models/mlp.toml (docs/workloads.md §2) as a spec body for Job, with 4
// worker slots: for the tests that run the example trainer.
#pragma once

namespace shmps::test {

inline constexpr const char* kMlpSpec = R"(
slice_bytes = 65536
max_workers = 4
[optimizer]
kind = "sgd"
lr = 0.05
[[param]]
name = "fc1.weight"
shape = [256, 784]
init = { kind = "u24", stream = 11, scale_divisor = 28 }
[[param]]
name = "fc1.bias"
shape = [256]
[[param]]
name = "fc2.weight"
shape = [10, 256]
init = { kind = "u24", stream = 12, scale_divisor = 16 }
[[param]]
name = "fc2.bias"
shape = [10]
)";

}  // namespace shmps::test
