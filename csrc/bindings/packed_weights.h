// The CPU GEMMs' packed panels of weights (int8 for the VNNI GEMM, fp32 and bf16 for the AVX-512
// and AVX512_BF16 ones, fp32 and int8 for the AVX2 one), kept between calls: packing costs a pass over the weights per call (the
// VNNI GEMM's pack_panel: 6% of all-MiniLM-L6-v2's w8a8 forward on the AMD EPYC; the bf16 GEMM's:
// 5% of its bf16 forward on real sentences). An entry serves a weight while the weight's storage
// lives, at the same address, unmodified: its version counter as it was (a write in place bumps
// it; tensors without one, inference tensors, are not served). Weights are taken in the order
// they come, until capacity() bytes are held in all (a quarter of the physical memory, at least
// 2 GiB, or TRANSFUSE_PACKED_WEIGHTS_MB; it was 256 MB, which all-mpnet-base-v2's fp32 panels,
// 340 MB, overran, then 2 GiB, which a process holding a Qwen3-0.6B-shaped model in fp32 and in
// bf16 overran: the later one's weights packed per call, its sentences one at a time 1.45x
// slower); entries go when their storage is freed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include <unistd.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace transfuse {

class PackedWeights {
 public:
  // The packed panels of w (contiguous, CPU) as `bytes` bytes that pack(w, out) fills (false:
  // it could not), or nothing (not kept: then packed per call). `layout` tells apart the packings
  // of one weight for different GEMMs (an int8 weight's for VNNI and for the bf16 GEMM).
  template <class Pack>
  std::optional<at::Tensor> of(const at::Tensor& w, int64_t bytes, Pack pack, int layout = 0) {
    if (!may_keep(w)) return std::nullopt;
    const c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
    const int64_t version = w._version();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto alive = it->storage.lock();
      if (!alive) {  // freed: its memory may hold another weight now
        held_ -= it->packed.numel();
        it = entries_.erase(it);
        continue;
      }
      if (alive.get() == storage && it->data == w.data_ptr() && it->shape == w.sizes() &&
          it->dtype == w.scalar_type() && it->layout == layout) {
        if (it->version == version) return it->packed;
        held_ -= it->packed.numel();  // written in place since: packed again below
        entries_.erase(it);
        break;
      }
      ++it;
    }
    if (held_ + bytes > capacity()) return std::nullopt;
    at::Tensor packed = at::empty({bytes}, w.options().dtype(at::kChar));
    if (!pack(w, packed)) return std::nullopt;
    entries_.push_back({w.storage().getWeakStorageImpl(), w.data_ptr(), w.sizes().vec(),
                        w.scalar_type(), layout, version, packed});
    held_ += bytes;
    return packed;
  }

  // Whether w's panels may be kept: not without a version counter to tell its writes (an
  // inference tensor, or a tensor whose .data was swapped across inference mode).
  static bool may_keep(const at::Tensor& w) {
    return w.unsafeGetTensorImpl()->version_counter().enabled();
  }

 private:
  static int64_t capacity() {
    static const int64_t bytes = [] {
      const char* megabytes = std::getenv("TRANSFUSE_PACKED_WEIGHTS_MB");
      if (megabytes && *megabytes) return std::max<int64_t>(0, std::atoll(megabytes)) << 20;
      const int64_t physical = int64_t(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
      return std::max<int64_t>(int64_t(2048) << 20, physical / 4);
    }();
    return bytes;
  }
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    std::vector<int64_t> shape;
    at::ScalarType dtype;
    int layout;
    int64_t version;
    at::Tensor packed;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
  int64_t held_ = 0;
};

// The one cache of the process.
inline PackedWeights& packed_weights() {
  static PackedWeights cache;
  return cache;
}

}  // namespace transfuse
