// OpenMP team sizes. Waking a thread costs microseconds, more than all the work of a tiny call (a
// decoding step's norm or GEMV), so a call takes at most one thread per task and one per
// `min_work` units of its work: a tiny call runs on the calling thread alone.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace transfuse::cpu {

inline int threads_for(int num_threads, int64_t tasks, int64_t work, int64_t min_work) {
  return int(std::max<int64_t>(
      1, std::min<int64_t>({num_threads, tasks, std::max<int64_t>(work, 0) / min_work + 1})));
}

// body() run by a team of `threads` OpenMP threads, or by the calling thread alone when threads is
// 1: entering even a one-thread team costs 0.3 us (libgomp, AMD EPYC), a tenth of a one-token
// call. Inside body, `#pragma omp for` shares a loop among the team (alone, the caller runs all of
// it) and omp_get_thread_num() / omp_get_num_threads() name the thread and the team's size. Inside
// another parallel region a one-thread team is still made, so that such a loop stays this call's.
template <class Body>
void in_team(int threads, Body&& body) {
  if (threads <= 1 && !omp_in_parallel()) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

}  // namespace transfuse::cpu
