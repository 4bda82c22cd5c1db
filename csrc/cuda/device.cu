#include "device.h"

#include <cuda_runtime.h>

#include <atomic>

namespace transfuse::cuda {

DeviceLimits device_limits() {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cached[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];  // cached[device] is filled in
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 0;
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && ready[device].load(std::memory_order_acquire)) return cached[device];
  DeviceLimits limits;
  const bool ok =
      cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device) ==
          cudaSuccess &&
      cudaDeviceGetAttribute(&limits.max_threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor,
                             device) == cudaSuccess &&
      cudaDeviceGetAttribute(&limits.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                             device) == cudaSuccess &&
      limits.sm_count > 0 && limits.max_threads_per_sm > 0 && limits.smem_per_sm > 0;
  if (!ok) {
    cudaGetLastError();  // clear the error of a failed query
    return DeviceLimits{};
  }
  if (cacheable) {  // two threads may both fill it in, with the same values
    cached[device] = limits;
    ready[device].store(true, std::memory_order_release);
  }
  return limits;
}

}  // namespace transfuse::cuda
