// What the launch heuristics of the CUDA kernels need to know of the current device.
#pragma once

namespace transfuse::cuda {

struct DeviceLimits {
  int sm_count = 1;
  int max_threads_per_sm = 2048;
  int smem_per_sm = 100 * 1024;  // shared memory per SM, bytes
};

// The current device's limits, asked once per device (devices 0..63; others every call). When the
// runtime cannot answer, the defaults above (and the query's error is cleared).
DeviceLimits device_limits();

}  // namespace transfuse::cuda
