#include "shmps/server/initialise.hpp"


#include <algorithm>

#include <shmps/splitmix.hpp>

#include "parallel.hpp"

namespace shmps::server {

void initialise(const InitSpec& init, std::span<float> values) {
  switch (init.kind) {
    case InitSpec::Kind::zeros:
      std::fill(values.begin(), values.end(), 0.0f);
      return;
    case InitSpec::Kind::constant:
      std::fill(values.begin(), values.end(), init.value);
      return;
    case InitSpec::Kind::u24:
      // Element k is draw k of the stream: each element is computed on its own, so the work
      // splits freely across threads and the bytes do not depend on the split.
      {
        constexpr std::size_t kChunk = 1 << 16;
        tbb::task_arena arena;
        parallel_for_index(arena, (values.size() + kChunk - 1) / kChunk, [&](std::size_t chunk, std::size_t) {
          const std::size_t end = std::min(values.size(), (chunk + 1) * kChunk);
          for (std::size_t k = chunk * kChunk; k < end; ++k) values[k] = u24(splitmix_draw(init.stream, k)) * init.scale;
        });
      }
      return;
  }
}

}  // namespace shmps::server
