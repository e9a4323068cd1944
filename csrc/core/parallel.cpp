// How many threads the CPU kernels' parallel regions really run on. at::parallel_for is compiled into
// this library, so a build without the parallel backend's flags (ATen's OpenMP backend needs -fopenmp,
// see CMakeLists.txt) silently runs every region on one thread; this probe, built with the same flags
// as the kernels, is how the tests and `python -m moe_swap info` tell.
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <thread>

#include "ops.h"

namespace moe_swap {

int64_t cpu_parallel_threads() {
  const int64_t threads = at::get_num_threads();
  std::mutex mutex;
  std::set<std::thread::id> seen;
  // grain 1 over many items: the backend splits the range across every thread it has.
  at::parallel_for(0, std::max<int64_t>(1, threads) * 64, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace moe_swap
