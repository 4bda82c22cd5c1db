// OpenMP team sizes. Waking a thread costs microseconds, more than all the work of a tiny call (a
// decoding step's norm or GEMV), so a call takes at most one thread per task and one per
// `min_work` units of its work: a tiny call runs on the calling thread alone.
#pragma once

#include <algorithm>
#include <cstdint>

namespace transfuse::cpu {

inline int threads_for(int num_threads, int64_t tasks, int64_t work, int64_t min_work) {
  return int(std::max<int64_t>(
      1, std::min<int64_t>({num_threads, tasks, std::max<int64_t>(work, 0) / min_work + 1})));
}

}  // namespace transfuse::cpu
