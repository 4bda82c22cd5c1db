// Torch-free test of the CUDA int8 kernels (cuda/int8.cu) against a CPU reference of the math of
// common/int8.h written out here:
//   quantize_per_token   q and scale compared exactly (IEEE division, round half to even: a row
//                        of x.5 values checks the ties), zero rows, cols 0, the scalar path
//                        (odd cols, misaligned pointers) and the 16-byte path, every dtype.
//   w8a8 GEMM            the raw int32 product compared exactly, including k = 1104 with values
//                        near +-127 (sums past 2^24, which an fp32 accumulation would round), and
//                        the dequantized output; both CTA tiles (the large one needs as many tiles
//                        as the GPU has SMs, so its shapes follow the SM count), the cp.async path
//                        and the byte-load path (k % 16 != 0, misaligned pointers), with and without
//                        bias, odd and even n (scalar and paired stores).
//   w8a16                the GEMV (m <= 16: 1, 2, 4 and 8 rows a block, two row groups, the k-split
//                        over warps) and the tiled kernel (m > 16), vector and scalar loads.
// The grid m in {1, 5, 16, 17, 100, 300} x n in {1, 7, 64, 130, 257} x k in {1, 15, 16, 100, 304}
// runs in every mode, the dtype and the bias varying from shape to shape. Every output buffer is
// poisoned (NaN, or 0x80 bytes for int8 / int32, values the kernels never produce) with guard
// elements before and after it, so an element left unwritten or written out of bounds fails.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80
//        -gencode arch=compute_90a,code=sm_90a -I csrc csrc/tests/test_int8_cuda.cu
//        csrc/cuda/int8.cu -o test_int8_cuda          (one command line)
//
// Prints one line a group of cases (and each failure) and "N passed, 0 failed"; returns 0 on
// success, 1 on a failure, 77 without a CUDA device (of compute capability 8.0 or more).
//
// Tolerances (ref computed in double from the same inputs). acc, q, scale: exact. Dequantized
// w8a8 out: |err| <= 1e-6 * (|acc * s_x * s_w| + |bias|) for fp32 (the kernel rounds three fp32
// operations), plus one unit in the last place of the dtype at |ref| for fp16 / bf16. w8a16 out:
// the fp32 summation bound (k + 8) * 2^-24 * sum_k |x w| * s_w on top of that.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/int8.h"
#include "tests/cuda_test_util.cuh"

using transfuse::DType;
using transfuse::Int8LinearParams;
using transfuse::QuantizeParams;

namespace {

using namespace transfuse::test;

constexpr double kDequantTolerance = 1e-6;
constexpr int64_t kGuard = 16;  // poisoned elements before and after every output

// Values (already representable in t) as the bytes of a [count] tensor of dtype t.
std::vector<uint8_t> encode(const std::vector<float>& values, DType t) {
  std::vector<uint8_t> bytes(values.size() * transfuse::dtype_size(t));
  for (size_t i = 0; i < values.size(); ++i) {
    if (t == DType::f32) {
      std::memcpy(&bytes[4 * i], &values[i], 4);
    } else {
      const uint16_t bits = to_bits(values[i], t);
      std::memcpy(&bytes[2 * i], &bits, 2);
    }
  }
  return bytes;
}

double decode(const std::vector<uint8_t>& bytes, DType t, int64_t index) {
  if (t == DType::f32) {
    float v;
    std::memcpy(&v, &bytes[static_cast<size_t>(4 * index)], 4);
    return v;
  }
  uint16_t bits;
  std::memcpy(&bits, &bytes[static_cast<size_t>(2 * index)], 2);
  return from_bits(bits, t);
}

// One unit in the last place of dtype t at magnitude |value| (0 for fp32: no final rounding).
double out_ulp(double value, DType t) {
  if (t == DType::f32) return 0.0;
  const int mantissa_bits = t == DType::f16 ? 10 : 7;
  const int min_exponent = t == DType::f16 ? -14 : -126;
  int exponent = min_exponent;
  if (value != 0.0) {
    int e = 0;
    std::frexp(std::fabs(value), &e);  // |value| = f 2^e, f in [0.5, 1)
    exponent = std::max(e - 1, min_exponent);
  }
  return std::ldexp(1.0, exponent - mantissa_bits);
}

// splitmix64: fast, seedable, good enough for test data.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(static_cast<double>(next() >> 40) * 0x1p-24);
  }
  int integer(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1)); }
};

// Device memory holding a tensor of `count` elements of `element_bytes` bytes, `offset` elements
// into the allocation (an offset of 1 misaligns it) with kGuard poisoned elements on each side.
class DeviceTensor {
 public:
  DeviceTensor(int64_t count, int element_bytes, int64_t offset = 0)
      : count_(count), element_bytes_(element_bytes), offset_(offset + kGuard) {
    total_bytes_ = static_cast<size_t>((offset_ + count_ + kGuard) * element_bytes_);
    check_cuda(cudaMalloc(&base_, total_bytes_), "cudaMalloc");
  }
  ~DeviceTensor() { cudaFree(base_); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  void* get() const { return static_cast<uint8_t*>(base_) + offset_ * element_bytes_; }
  void poison(uint8_t byte) { check_cuda(cudaMemset(base_, byte, total_bytes_), "poison"); }
  void upload(const void* host) {
    if (count_ == 0) return;
    check_cuda(cudaMemcpy(get(), host, static_cast<size_t>(count_ * element_bytes_), cudaMemcpyHostToDevice),
               "upload");
  }
  // The tensor's bytes; `guards_intact` says whether the bytes around it still hold `poison`.
  std::vector<uint8_t> download(uint8_t poison, bool* guards_intact) const {
    std::vector<uint8_t> all(total_bytes_);
    check_cuda(cudaMemcpy(all.data(), base_, total_bytes_, cudaMemcpyDeviceToHost), "download");
    const size_t begin = static_cast<size_t>(offset_ * element_bytes_);
    const size_t end = begin + static_cast<size_t>(count_ * element_bytes_);
    *guards_intact = true;
    for (size_t i = 0; i < all.size(); ++i) {
      if ((i < begin || i >= end) && all[i] != poison) *guards_intact = false;
    }
    return std::vector<uint8_t>(all.begin() + static_cast<std::ptrdiff_t>(begin),
                                all.begin() + static_cast<std::ptrdiff_t>(end));
  }

 private:
  void* base_ = nullptr;
  int64_t count_;
  int64_t element_bytes_;
  int64_t offset_;
  size_t total_bytes_ = 0;
};

// Reports the first few mismatches of a case.
struct Failures {
  std::string name;
  int64_t count = 0;
  void add(const char* what, long long index, double got, double want, double tolerance) {
    if (count == 0) std::printf("FAIL %s\n", name.c_str());
    if (count < 8) {
      std::printf("  %s[%lld]: got %.9g, want %.9g (tolerance %.3g)\n", what, index, got, want, tolerance);
    }
    ++count;
  }
  bool ok() const {
    if (count > 8) std::printf("  ... %lld mismatches in all\n", static_cast<long long>(count));
    return count == 0;
  }
};

// ------------------------------------------------------------------------------------------------
// quantize_per_token
// ------------------------------------------------------------------------------------------------

bool run_quantize(int64_t rows, int64_t cols, DType dtype, bool misaligned, uint64_t seed) {
  Rng rng{seed};
  const std::string name = "quantize " + std::to_string(rows) + " x " + std::to_string(cols) + " " +
                           dtype_name(dtype) + (misaligned ? " misaligned" : "");
  // Rows of varied magnitude; row 0 zero, row 1 (when rows > 2) the ties of round half to even:
  // absmax 127 makes the scale exactly 1, so x / scale = x.
  std::vector<float> x(static_cast<size_t>(rows * cols));
  const float ties[] = {127.f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f, 126.5f, -126.5f, 64.5f, -0.f};
  for (int64_t i = 0; i < rows; ++i) {
    const float magnitude = std::pow(10.f, rng.uniform(-3.f, 3.f));
    for (int64_t j = 0; j < cols; ++j) {
      float v = rng.uniform(-1.f, 1.f) * magnitude;
      if (i == 0) v = 0.f;
      if (i == 1 && rows > 2) v = ties[j % 12];
      x[static_cast<size_t>(i * cols + j)] = round_to(v, dtype);
    }
  }
  const int x_bytes = transfuse::dtype_size(dtype);
  DeviceTensor d_x(rows * cols, x_bytes, misaligned ? 1 : 0);
  DeviceTensor d_q(rows * cols, 1, misaligned ? 1 : 0);
  DeviceTensor d_scale(rows, 4);
  d_x.poison(0xFF);
  d_x.upload(encode(x, dtype).data());
  d_q.poison(0x80);
  d_scale.poison(0xFF);

  QuantizeParams p;
  p.x = d_x.get();
  p.q = static_cast<int8_t*>(d_q.get());
  p.scale = static_cast<float*>(d_scale.get());
  p.rows = rows;
  p.cols = cols;
  p.dtype = dtype;
  transfuse::cuda::quantize_per_token_launch(p, nullptr);
  check_cuda(cudaGetLastError(), "quantize_per_token_launch");
  check_cuda(cudaDeviceSynchronize(), "quantize kernel");

  Failures failures{name};
  bool q_guards = true, scale_guards = true;
  const std::vector<uint8_t> q = d_q.download(0x80, &q_guards);
  const std::vector<uint8_t> scale_bytes = d_scale.download(0xFF, &scale_guards);
  if (!q_guards) failures.add("q guard written", -1, 0, 0, 0);
  if (!scale_guards) failures.add("scale guard written", -1, 0, 0, 0);
  for (int64_t i = 0; i < rows; ++i) {
    float absmax = 0.f;
    for (int64_t j = 0; j < cols; ++j) absmax = std::max(absmax, std::fabs(x[static_cast<size_t>(i * cols + j)]));
    const float want_scale = absmax / 127.f == 0.f ? 1.f : absmax / 127.f;
    float got_scale;
    std::memcpy(&got_scale, &scale_bytes[static_cast<size_t>(4 * i)], 4);
    if (std::memcmp(&got_scale, &want_scale, 4) != 0) failures.add("scale", i, got_scale, want_scale, 0);
    for (int64_t j = 0; j < cols; ++j) {
      const size_t at = static_cast<size_t>(i * cols + j);
      const float v = std::nearbyint(x[at] / want_scale);  // default rounding: to nearest even
      const int want = static_cast<int>(std::min(std::max(v, -127.f), 127.f));
      const int got = static_cast<int8_t>(q[at]);
      if (got != want) failures.add("q", static_cast<long long>(at), got, want, 0);
    }
  }
  return failures.ok();
}

// ------------------------------------------------------------------------------------------------
// int8_linear
// ------------------------------------------------------------------------------------------------

enum class Mode { w8a8, acc, w8a16 };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::acc: return "w8a8 acc";
    case Mode::w8a16: return "w8a16";
    default: return "w8a8";
  }
}

struct LinearCase {
  Mode mode = Mode::w8a8;
  int64_t m = 1;
  int64_t n = 1;
  int64_t k = 1;
  DType dtype = DType::f32;
  bool bias = false;
  bool misaligned = false;  // x_q / x and w one element past 16-byte alignment (scalar loads)
  bool saturated = false;   // int8 values near +-127 in long runs of one sign: sums past 2^24
};

std::string describe(const LinearCase& c) {
  char text[160];
  std::snprintf(text, sizeof(text), "%s m %lld n %lld k %lld %s%s%s%s", mode_name(c.mode),
                static_cast<long long>(c.m), static_cast<long long>(c.n), static_cast<long long>(c.k),
                dtype_name(c.dtype), c.bias ? " bias" : "", c.misaligned ? " misaligned" : "",
                c.saturated ? " saturated" : "");
  return text;
}

// Rows of int8 in [-127, 127]: random, or (saturated) row i mostly of sign (-1)^i near 127.
std::vector<int8_t> int8_rows(int64_t rows, int64_t cols, bool saturated, Rng& rng) {
  std::vector<int8_t> values(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    const bool run = saturated && i % 4 != 3;  // every fourth row stays random
    const int sign = i % 2 == 0 ? 1 : -1;
    for (int64_t j = 0; j < cols; ++j) {
      const int v = run ? sign * (127 - rng.integer(0, 3)) : rng.integer(-127, 127);
      values[static_cast<size_t>(i * cols + j)] = static_cast<int8_t>(v);
    }
  }
  return values;
}

bool run_linear(const LinearCase& c, uint64_t seed) {
  Rng rng{seed};
  const int64_t m = c.m, n = c.n, k = c.k;
  const int elem = transfuse::dtype_size(c.dtype);
  const int64_t misalign = c.misaligned ? 1 : 0;

  // ---- inputs ----
  const std::vector<int8_t> w = int8_rows(n, k, c.saturated, rng);
  std::vector<float> w_scale(static_cast<size_t>(n));
  for (float& s : w_scale) s = rng.uniform(1e-3f, 1e-2f);
  std::vector<float> bias(static_cast<size_t>(n), 0.f);
  if (c.bias) {
    for (float& b : bias) b = round_to(rng.uniform(-1.f, 1.f), c.dtype);
  }
  std::vector<int8_t> x_q;
  std::vector<float> x_scale(static_cast<size_t>(m));
  std::vector<float> x;
  if (c.mode == Mode::w8a16) {
    x.resize(static_cast<size_t>(m * k));
    for (float& v : x) v = round_to(rng.uniform(-1.f, 1.f), c.dtype);
  } else {
    x_q = int8_rows(m, k, c.saturated, rng);
    for (float& s : x_scale) s = rng.uniform(1e-3f, 1e-2f);
  }

  DeviceTensor d_w(n * k, 1, misalign);
  DeviceTensor d_w_scale(n, 4);
  DeviceTensor d_bias(n, elem);
  DeviceTensor d_x(m * k, c.mode == Mode::w8a16 ? elem : 1, misalign);
  DeviceTensor d_x_scale(m, 4);
  const bool raw = c.mode == Mode::acc;
  DeviceTensor d_out(m * n, raw ? 4 : elem);
  for (DeviceTensor* t : {&d_w, &d_w_scale, &d_bias, &d_x, &d_x_scale}) t->poison(0xFF);
  // int32 0x80808080 = -2139062144 (every |acc| here is below 2^25), or NaN.
  const uint8_t out_poison = raw ? 0x80 : 0xFF;
  d_out.poison(out_poison);
  d_w.upload(w.data());
  d_w_scale.upload(w_scale.data());
  d_bias.upload(encode(bias, c.dtype).data());
  if (c.mode == Mode::w8a16) {
    d_x.upload(encode(x, c.dtype).data());
  } else {
    d_x.upload(x_q.data());
    d_x_scale.upload(x_scale.data());
  }

  Int8LinearParams p;
  if (c.mode == Mode::w8a16) {
    p.x = d_x.get();
  } else {
    p.x_q = static_cast<const int8_t*>(d_x.get());
    p.x_scale = raw ? nullptr : static_cast<const float*>(d_x_scale.get());
  }
  p.w = static_cast<const int8_t*>(d_w.get());
  p.w_scale = raw ? nullptr : static_cast<const float*>(d_w_scale.get());
  p.bias = c.bias && !raw ? d_bias.get() : nullptr;
  if (raw) {
    p.acc = static_cast<int32_t*>(d_out.get());
  } else {
    p.out = d_out.get();
  }
  p.m = m;
  p.n = n;
  p.k = k;
  p.dtype = c.dtype;

  Failures failures{describe(c)};
  const char* unsupported = transfuse::cuda::int8_linear_unsupported(p);
  if (unsupported[0] != '\0') {
    failures.add(unsupported, -1, 0, 0, 0);
    return failures.ok();
  }
  transfuse::cuda::int8_linear_launch(p, nullptr);
  check_cuda(cudaGetLastError(), "int8_linear_launch");
  check_cuda(cudaDeviceSynchronize(), "int8_linear kernels");

  bool guards = true;
  const std::vector<uint8_t> out = d_out.download(out_poison, &guards);
  if (!guards) failures.add("out guard written", -1, 0, 0, 0);

  // ---- reference and comparison ----
  const double unit = std::ldexp(1.0, -24);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = i * n + j;
      if (c.mode == Mode::w8a16) {
        double sum = 0.0, sum_abs = 0.0;
        for (int64_t kk = 0; kk < k; ++kk) {
          const double term = double(x[static_cast<size_t>(i * k + kk)]) * w[static_cast<size_t>(j * k + kk)];
          sum += term;
          sum_abs += std::fabs(term);
        }
        const double sw = w_scale[static_cast<size_t>(j)];
        const double want = sum * sw + bias[static_cast<size_t>(j)];
        const double tolerance = double(k + 8) * unit * sum_abs * sw +
                                 kDequantTolerance * (std::fabs(sum * sw) + std::fabs(bias[static_cast<size_t>(j)])) +
                                 out_ulp(want, c.dtype);
        const double got = decode(out, c.dtype, at);
        if (!(std::fabs(got - want) <= tolerance)) failures.add("out", static_cast<long long>(at), got, want, tolerance);
        continue;
      }
      const int8_t* x_row = x_q.data() + i * k;
      const int8_t* w_row = w.data() + j * k;
      int32_t acc = 0;  // |acc| <= k * 127^2 stays far below 2^31 for the k used here
      for (int64_t kk = 0; kk < k; ++kk) acc += int32_t(x_row[kk]) * int32_t(w_row[kk]);
      if (raw) {
        int32_t got;
        std::memcpy(&got, &out[static_cast<size_t>(4 * at)], 4);
        if (got != acc) failures.add("acc", static_cast<long long>(at), got, static_cast<double>(acc), 0);
        continue;
      }
      const double scaled = double(acc) * x_scale[static_cast<size_t>(i)] * w_scale[static_cast<size_t>(j)];
      const double want = scaled + bias[static_cast<size_t>(j)];
      const double tolerance =
          kDequantTolerance * (std::fabs(scaled) + std::fabs(bias[static_cast<size_t>(j)])) + out_ulp(want, c.dtype);
      const double got = decode(out, c.dtype, at);
      if (!(std::fabs(got - want) <= tolerance)) failures.add("out", static_cast<long long>(at), got, want, tolerance);
    }
  }
  return failures.ok();
}

// int8_linear_unsupported's rules; host only.
bool check_unsupported() {
  static const int8_t byte = 0;
  static const float scale = 1.f;
  static float out = 0.f;
  static int32_t acc = 0;
  Int8LinearParams p;
  bool ok = true;
  auto expect = [&](bool supported, const char* what) {
    const bool got = transfuse::cuda::int8_linear_unsupported(p)[0] == '\0';
    if (got != supported) {
      std::printf("FAIL int8_linear_unsupported: %s should be %s\n", what, supported ? "supported" : "unsupported");
      ok = false;
    }
  };
  auto w8a8 = [&]() {
    p = Int8LinearParams{};
    p.x_q = &byte;
    p.x_scale = &scale;
    p.w = &byte;
    p.w_scale = &scale;
    p.out = &out;
    p.m = p.n = p.k = 1;
  };
  auto w8a16 = [&]() {
    p = Int8LinearParams{};
    p.x = &out;
    p.w = &byte;
    p.w_scale = &scale;
    p.out = &out;
    p.m = p.n = p.k = 1;
  };
  w8a8();
  expect(true, "w8a8");
  p.k = transfuse::cuda::kInt8LinearMaxExactK;
  expect(true, "w8a8 at the largest exact k");
  p.k = transfuse::cuda::kInt8LinearMaxExactK + 1;
  expect(false, "w8a8 past the largest exact k");
  w8a8();
  p.w_scale = nullptr;
  expect(false, "w8a8 without w_scale");
  w8a8();
  p.out = nullptr;
  expect(false, "w8a8 without out");
  w8a8();
  p.x = &out;
  expect(false, "both x_q and x");
  w8a8();
  p.x_scale = p.w_scale = nullptr;
  p.out = nullptr;
  p.acc = &acc;
  expect(true, "w8a8 raw product (no scales)");
  w8a8();
  p.x_q = nullptr;
  expect(false, "w8a8 without x_q");
  p.k = 0;
  expect(true, "w8a8 with k = 0 and null x_q, w (empty tensors)");
  p.w = nullptr;
  expect(true, "w8a8 with k = 0 and null w");
  w8a16();
  expect(true, "w8a16");
  p.k = int64_t(1) << 20;
  expect(true, "w8a16 with k past the int32 limit of w8a8");
  p.k = (int64_t(1) << 30) + 1;
  expect(false, "k past 2^30");
  w8a16();
  p.acc = &acc;
  expect(false, "w8a16 with acc");
  w8a16();
  p.w_scale = nullptr;
  expect(false, "w8a16 without w_scale");
  w8a16();
  p.x = nullptr;
  expect(false, "neither x_q nor x");
  p.k = 0;
  p.w = nullptr;
  expect(true, "w8a16 with k = 0 and null x, w (empty tensors)");
  w8a16();
  p.m = -1;
  expect(false, "negative m");
  p.m = (int64_t(1) << 30) + 1;
  expect(false, "m past 2^30");
  p.m = int64_t(1) << 30;
  p.n = int64_t(1) << 30;
  expect(false, "2^60 outputs");
  p.n = 1;
  expect(true, "m = 2^30");
  p.m = 0;
  p.x = nullptr;
  p.w_scale = nullptr;
  p.out = nullptr;
  expect(true, "m = 0, nothing set");
  return ok;
}

}  // namespace

int main() {
  const bool rules_ok = check_unsupported();
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    cudaGetLastError();
    std::printf("no CUDA device: skipped\n");
    return rules_ok ? 77 : 1;
  }
  int major = 0, sm_count = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0), "SM count");
  if (major < 8) {
    std::printf("CUDA device of compute capability %d.x (needs 8.0): skipped\n", major);
    return rules_ok ? 77 : 1;
  }

  int passed = 0;
  int failed = rules_ok ? 0 : 1;
  uint64_t seed = 1;
  auto tally = [&](const char* group, int group_passed, int group_failed) {
    std::printf("%s %s: %d cases, %d failed\n", group_failed == 0 ? "ok  " : "FAIL", group,
                group_passed + group_failed, group_failed);
    passed += group_passed;
    failed += group_failed;
  };

  // ---- quantize ----
  {
    int ok = 0, bad = 0;
    const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
    const int64_t row_counts[] = {1, 5, 17, 300};
    const int64_t col_counts[] = {0, 1, 7, 15, 16, 100, 304, 1000, 4096, 4104, 16384};
    for (DType dtype : dtypes) {
      for (int64_t rows : row_counts) {
        for (int64_t cols : col_counts) {
          for (bool misaligned : {false, true}) {
            if (misaligned && cols % 8 != 0) continue;  // odd rows take the scalar path anyway
            (run_quantize(rows, cols, dtype, misaligned, seed++) ? ok : bad)++;
          }
        }
      }
    }
    tally("quantize_per_token", ok, bad);
  }

  // ---- the grid of awkward shapes, every mode ----
  {
    int ok = 0, bad = 0;
    const int64_t ms[] = {1, 5, 16, 17, 100, 300};
    const int64_t ns[] = {1, 7, 64, 130, 257};
    const int64_t ks[] = {1, 15, 16, 100, 304};
    const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
    int index = 0;
    for (Mode mode : {Mode::w8a8, Mode::acc, Mode::w8a16}) {
      for (int64_t m : ms) {
        for (int64_t n : ns) {
          for (int64_t k : ks) {
            LinearCase c;
            c.mode = mode;
            c.m = m;
            c.n = n;
            c.k = k;
            c.dtype = dtypes[index % 3];
            c.bias = (index / 3) % 2 == 1;
            ++index;
            (run_linear(c, seed++) ? ok : bad)++;
          }
        }
      }
    }
    tally("int8_linear shape grid", ok, bad);
  }

  // ---- special cases ----
  {
    int ok = 0, bad = 0;
    // The large tile needs ceil(m / 128) * ceil(n / 128) >= SMs (and m > 64): 9 row tiles.
    const int64_t large_m = 1025;
    const int64_t large_n_odd = 128 * ((sm_count + 8) / 9) + 7;
    const int64_t large_n_even = 128 * ((sm_count + 8) / 9) + 2;
    std::vector<LinearCase> cases;
    auto add = [&](Mode mode, int64_t m, int64_t n, int64_t k, DType dtype, bool bias, bool misaligned = false,
                   bool saturated = false) {
      LinearCase c;
      c.mode = mode;
      c.m = m;
      c.n = n;
      c.k = k;
      c.dtype = dtype;
      c.bias = bias;
      c.misaligned = misaligned;
      c.saturated = saturated;
      cases.push_back(c);
    };
    // Exact int32 sums past 2^24: the small tile, the large tile, the byte-load path (k = 1100).
    add(Mode::acc, 17, 64, 1104, DType::f32, false, false, true);
    add(Mode::acc, 300, 257, 1104, DType::f32, false, false, true);
    add(Mode::acc, large_m, large_n_even, 1104, DType::f32, false, false, true);
    add(Mode::acc, 5, 130, 1100, DType::f32, false, false, true);
    add(Mode::w8a8, 100, 64, 1104, DType::f32, true, false, true);
    // The large tile: cp.async and byte-load paths, paired and scalar stores, every dtype.
    add(Mode::w8a8, large_m, large_n_odd, 304, DType::f32, true);
    add(Mode::w8a8, large_m, large_n_even, 256, DType::f16, true);
    add(Mode::w8a8, large_m, large_n_even, 100, DType::bf16, false);
    add(Mode::acc, large_m, large_n_odd, 64, DType::f32, false);
    // Misaligned pointers: the byte-load path with k % 16 == 0, scalar x loads in w8a16.
    add(Mode::w8a8, 100, 130, 304, DType::bf16, true, true);
    add(Mode::acc, 1, 64, 304, DType::f32, false, true);
    add(Mode::w8a16, 5, 64, 304, DType::f16, true, true);
    add(Mode::w8a16, 1, 257, 1024, DType::bf16, false, true);
    add(Mode::w8a16, 100, 130, 304, DType::f32, true, true);
    // The GEMV's row variants (1, 2, 4, 8 and two groups of 8) and its k-split over warps.
    for (int64_t m : {1, 2, 3, 4, 8, 9, 16}) add(Mode::w8a16, m, 257, 4096, DType::bf16, m % 2 == 1);
    add(Mode::w8a16, 1, 7, 16400, DType::f16, true);   // k split over 8 warps, a tail chunk
    add(Mode::w8a16, 2, 7, 4096, DType::f32, false);   // k split over 4 warps
    add(Mode::w8a16, 3, 64, 2048, DType::f32, true);   // k split over 2 warps
    add(Mode::w8a16, 16, 130, 4100, DType::f16, true); // k % 16 != 0: scalar weight loads
    add(Mode::w8a16, 1, 4096, 4096, DType::bf16, true);
    add(Mode::w8a16, 64, 1000, 1000, DType::f16, false);
    // k = 0: out = bias (or 0).
    add(Mode::w8a8, 5, 7, 0, DType::f16, true);
    add(Mode::w8a16, 3, 7, 0, DType::bf16, true);
    add(Mode::w8a16, 40, 7, 0, DType::f32, false);
    // Decoding-sized w8a8 on the small tile.
    add(Mode::w8a8, 1, 4096, 4096, DType::bf16, true);
    add(Mode::w8a8, 64, 1000, 2048, DType::f16, false);
    for (const LinearCase& c : cases) (run_linear(c, seed++) ? ok : bad)++;
    tally("int8_linear special cases", ok, bad);
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
