#include "shmps/server/initialise.hpp"

#include <tbb/parallel_for.h>

#include <algorithm>

#include <shmps/splitmix.hpp>

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
      tbb::parallel_for(tbb::blocked_range<std::size_t>(0, values.size(), 1 << 16), [&](const auto& range) {
        for (std::size_t k = range.begin(); k != range.end(); ++k)
          values[k] = u24(splitmix_draw(init.stream, k)) * init.scale;
      });
      return;
  }
}

}  // namespace shmps::server
