// Torch-free test of the CUDA norm kernels (cuda/norm.cu) against a double-precision reference
// written out here: LayerNorm and RMSNorm, with and without residual / weight / bias /
// weight_offset, over many shapes and every (x, weight, out, normalized) dtype combination, the
// vector paths and the unaligned (scalar) paths, forward and backward (dx, dweight, dbias).
// Every output buffer (and the backward workspace) is filled with NaN (0xFF bytes) before the
// kernels run, so an element they forget to write fails.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80 \
//        -gencode arch=compute_90a,code=sm_90a -I csrc csrc/tests/test_norm_cuda.cu \
//        csrc/cuda/norm.cu -o test_norm_cuda
//
// Prints "N passed, 0 failed" and returns 0 on success, 1 on a failure, 77 without a CUDA device.
//
// Tolerances. fp32 results: |err| <= 1e-5 * (the magnitude of the terms that make the value up).
// 16-bit results: the same plus 2 units in the last place of the result's dtype, or 2 subnormal
// steps for tiny f16 values (the kernel and the reference may round a value sitting next to a
// rounding boundary to neighbouring numbers), and 2 more of the normalized dtype where x_hat is
// rounded before the weight multiply.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda/norm.h"
#include "tests/cuda_test_util.cuh"

using transfuse::DType;

namespace {

using namespace transfuse::test;


// Half a unit in the last place relative to the value (the rounding error bound) of each dtype.
double unit_roundoff(DType t) {
  switch (t) {
    case DType::f16: return std::ldexp(1.0, -11);
    case DType::bf16: return std::ldexp(1.0, -8);
    default: return std::ldexp(1.0, -24);
  }
}

// What rounding to dtype t (16-bit only; fp32 values are compared unrounded) may move value by,
// twice over: 2 units in the last place, with the subnormal spacing as the floor for f16.
double rounding_tolerance(DType t, double value) {
  if (t == DType::f32) return 0.0;
  const double min_spacing = t == DType::f16 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -133);
  return 2 * (2 * unit_roundoff(t) * std::fabs(value) + min_spacing);
}

float round_to(float value, DType t) {
  switch (t) {
    case DType::f16: return __half2float(__float2half_rn(value));
    case DType::bf16: return __bfloat162float(__float2bfloat16_rn(value));
    default: return value;
  }
}

std::vector<uint8_t> encode(const std::vector<float>& values, DType t) {
  std::vector<uint8_t> bytes(values.size() * transfuse::dtype_size(t));
  for (size_t i = 0; i < values.size(); ++i) {
    if (t == DType::f32) {
      std::memcpy(&bytes[4 * i], &values[i], 4);
    } else if (t == DType::f16) {
      const __half v = __float2half_rn(values[i]);
      std::memcpy(&bytes[2 * i], &v, 2);
    } else {
      const __nv_bfloat16 v = __float2bfloat16_rn(values[i]);
      std::memcpy(&bytes[2 * i], &v, 2);
    }
  }
  return bytes;
}

std::vector<float> decode(const std::vector<uint8_t>& bytes, DType t) {
  const size_t n = bytes.size() / transfuse::dtype_size(t);
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) {
    if (t == DType::f32) {
      std::memcpy(&values[i], &bytes[4 * i], 4);
    } else if (t == DType::f16) {
      __half v;
      std::memcpy(&v, &bytes[2 * i], 2);
      values[i] = __half2float(v);
    } else {
      __nv_bfloat16 v;
      std::memcpy(&v, &bytes[2 * i], 2);
      values[i] = __bfloat162float(v);
    }
  }
  return values;
}

// n random values in [lo, hi) already rounded to dtype t.
std::vector<float> random_values(Rng& rng, int64_t n, float lo, float hi, DType t) {
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& v : values) v = round_to(rng.uniform(lo, hi), t);
  return values;
}

// Device memory, optionally starting `offset` bytes past a 256-byte aligned allocation.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, size_t offset = 0) : bytes_(bytes) {
    check_cuda(cudaMalloc(&base_, bytes + offset + 16), "cudaMalloc");
    ptr_ = static_cast<char*>(base_) + offset;
  }
  ~DeviceBuffer() { cudaFree(base_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  void upload(const std::vector<uint8_t>& host) {
    check_cuda(cudaMemcpy(ptr_, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(bytes_);
    check_cuda(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
    return host;
  }
  void poison() { check_cuda(cudaMemset(ptr_, 0xFF, bytes_), "poison"); }  // NaN in every dtype

 private:
  void* base_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Case {
  int64_t rows = 1;
  int64_t cols = 1;
  bool rms = false;
  bool residual = false;
  bool weight = false;
  bool bias = false;
  float weight_offset = 0.f;
  float eps = 1e-5f;
  float mean_offset = 0.f;  // added to x: tests the accuracy of the variance
  DType x = DType::f32;
  DType w = DType::f32;
  DType out = DType::f32;
  DType normalized = DType::f32;
  bool misaligned = false;  // every pointer one element past an aligned address

  std::string describe() const {
    char text[320];
    std::snprintf(text, sizeof(text),
                  "%s rows=%lld cols=%lld x=%s w=%s out=%s normalized=%s%s%s%s offset=%g "
                  "mean_offset=%g%s",
                  rms ? "RMSNorm" : "LayerNorm", static_cast<long long>(rows),
                  static_cast<long long>(cols), dtype_name(x), dtype_name(w), dtype_name(out),
                  dtype_name(normalized), residual ? " +residual" : "", weight ? " +weight" : "",
                  bias ? " +bias" : "", weight_offset, mean_offset, misaligned ? " misaligned" : "");
    return text;
  }
};

std::mutex print_mutex;  // the cases run on several host threads: one case's report at a time

// Collects the mismatches of one case; prints the first few when the case ends.
class Checker {
 public:
  explicit Checker(const Case& c) : case_(c) {}
  ~Checker() {
    if (failures_ > 8) add("  ... %lld mismatches in all\n", static_cast<long long>(failures_));
    std::lock_guard<std::mutex> lock(print_mutex);
    std::fputs(report_.c_str(), stdout);
  }

  void expect_near(const char* what, int64_t index, double got, double want, double tolerance) {
    if (std::fabs(got - want) <= tolerance) return;  // NaN fails here
    if (failures_ == 0) add("FAIL %s\n", case_.describe().c_str());
    if (failures_ < 8) {
      add("  %s[%lld]: got %.9g, want %.9g (tolerance %.3g)\n", what,
          static_cast<long long>(index), got, want, tolerance);
    }
    ++failures_;
  }

  void fail(const char* why) {
    if (failures_++ == 0) add("FAIL %s\n", case_.describe().c_str());
    add("  %s\n", why);
  }

  bool passed() const { return failures_ == 0; }

 private:
  template <typename... Args>
  void add(const char* format, Args... args) {
    char line[512];
    std::snprintf(line, sizeof(line), format, args...);
    report_ += line;
  }

  const Case& case_;
  int64_t failures_ = 0;
  std::string report_;
};

constexpr double kRelTol = 1e-5;

bool run_case(const Case& c, uint64_t seed) {
  Rng rng{seed};
  const int64_t rows = c.rows;
  const int64_t cols = c.cols;
  const int64_t n = rows * cols;
  const bool has_bias = c.bias && !c.rms;

  // ---- inputs (exactly representable in their dtypes) ----
  const std::vector<float> x = random_values(rng, n, c.mean_offset - 1.f, c.mean_offset + 1.f, c.x);
  const std::vector<float> residual = c.residual ? random_values(rng, n, -1.f, 1.f, c.x) : std::vector<float>();
  const float weight_lo = c.weight_offset != 0.f ? -0.5f : 0.5f;
  const std::vector<float> weight = c.weight ? random_values(rng, cols, weight_lo, weight_lo + 1.f, c.w) : std::vector<float>();
  const std::vector<float> bias = has_bias ? random_values(rng, cols, -0.5f, 0.5f, c.w) : std::vector<float>();
  const std::vector<float> dy = random_values(rng, n, -1.f, 1.f, c.out);
  const std::vector<float> dresidual = c.residual ? random_values(rng, n, -1.f, 1.f, c.x) : std::vector<float>();

  // h = round_x(x + residual), the sum taken in fp32 as the spec says.
  std::vector<float> h(x);
  if (c.residual) {
    for (int64_t i = 0; i < n; ++i) h[i] = round_to(x[i] + residual[i], c.x);
  }
  auto scale_of = [&](int64_t col) -> double {
    return c.weight ? static_cast<double>(c.weight_offset) + weight[col] : 1.0;
  };

  // ---- device buffers ----
  const size_t xs = transfuse::dtype_size(c.x), ws = transfuse::dtype_size(c.w),
               os = transfuse::dtype_size(c.out);
  auto offset = [&](size_t element_bytes) { return c.misaligned ? element_bytes : 0; };
  const size_t un = static_cast<size_t>(n);
  const size_t ucols = static_cast<size_t>(cols);
  DeviceBuffer d_x(un * xs, offset(xs)), d_residual(un * xs, offset(xs)),
      d_residual_out(un * xs, offset(xs)), d_weight(ucols * ws, offset(ws)),
      d_bias(ucols * ws, offset(ws)), d_y(un * os, offset(os)), d_mean(static_cast<size_t>(rows) * 4),
      d_rstd(static_cast<size_t>(rows) * 4), d_dy(un * os, offset(os)),
      d_dresidual(un * xs, offset(xs)), d_dx(un * xs, offset(xs)), d_dweight(ucols * ws, offset(ws)),
      d_dbias(ucols * ws, offset(ws));
  d_x.upload(encode(x, c.x));
  if (c.residual) d_residual.upload(encode(residual, c.x));
  if (c.weight) d_weight.upload(encode(weight, c.w));
  if (has_bias) d_bias.upload(encode(bias, c.w));
  d_dy.upload(encode(dy, c.out));
  if (c.residual) d_dresidual.upload(encode(dresidual, c.x));
  for (DeviceBuffer* b : {&d_residual_out, &d_y, &d_mean, &d_rstd, &d_dx, &d_dweight, &d_dbias}) b->poison();

  // ---- forward ----
  transfuse::NormForwardParams fp;
  fp.x = d_x.get();
  fp.residual = c.residual ? d_residual.get() : nullptr;
  fp.weight = c.weight ? d_weight.get() : nullptr;
  fp.bias = has_bias ? d_bias.get() : nullptr;
  fp.y = d_y.get();
  fp.residual_out = c.residual ? d_residual_out.get() : nullptr;
  fp.mean = c.rms ? nullptr : static_cast<float*>(d_mean.get());
  fp.rstd = static_cast<float*>(d_rstd.get());
  fp.rows = rows;
  fp.cols = cols;
  fp.eps = c.eps;
  fp.weight_offset = c.weight_offset;
  fp.rms = c.rms;
  fp.x_dtype = c.x;
  fp.weight_dtype = c.w;
  fp.normalized_dtype = c.normalized;
  fp.out_dtype = c.out;
  transfuse::cuda::norm_forward_launch(fp, nullptr);
  check_cuda(cudaGetLastError(), "norm_forward_launch");
  check_cuda(cudaDeviceSynchronize(), "norm_forward kernels");

  Checker check(c);
  const std::vector<float> y = decode(d_y.download(), c.out);
  const std::vector<float> mean = c.rms ? std::vector<float>(rows, 0.f) : decode(d_mean.download(), DType::f32);
  const std::vector<float> rstd = decode(d_rstd.download(), DType::f32);
  if (c.residual) {
    const std::vector<float> residual_out = decode(d_residual_out.download(), c.x);
    for (int64_t i = 0; i < n; ++i) check.expect_near("residual_out", i, residual_out[i], h[i], 0.0);
  }
  for (int64_t row = 0; row < rows; ++row) {
    const float* hr = &h[row * cols];
    double mean_ref = 0.0;
    if (!c.rms) {
      for (int64_t j = 0; j < cols; ++j) mean_ref += hr[j];
      mean_ref /= static_cast<double>(cols);
    }
    double variance = 0.0;
    for (int64_t j = 0; j < cols; ++j) variance += (hr[j] - mean_ref) * (hr[j] - mean_ref);
    variance /= static_cast<double>(cols);
    const double rstd_ref = 1.0 / std::sqrt(variance + static_cast<double>(c.eps));
    if (!c.rms) {
      check.expect_near("mean", row, mean[row], mean_ref,
                        kRelTol * (std::fabs(mean_ref) + std::sqrt(variance)));
    }
    check.expect_near("rstd", row, rstd[row], rstd_ref, 2 * kRelTol * rstd_ref);
    for (int64_t j = 0; j < cols; ++j) {
      const double x_hat = (hr[j] - mean_ref) * rstd_ref;
      const double normalized = c.normalized == DType::f32 ? x_hat : round_to(static_cast<float>(x_hat), c.normalized);
      const double scaled = normalized * scale_of(j);
      const double shift = has_bias ? bias[j] : 0.0;
      const double want = scaled + shift;
      const double tolerance =
          kRelTol * std::max(1.0, std::fabs(x_hat * scale_of(j)) + std::fabs(shift)) +
          rounding_tolerance(c.out, want) +
          rounding_tolerance(c.normalized, normalized) * std::fabs(scale_of(j));
      check.expect_near("y", row * cols + j, y[row * cols + j], want, tolerance);
    }
  }

  // ---- backward, from the forward's h, mean and rstd ----
  transfuse::NormBackwardParams bp;
  bp.dy = d_dy.get();
  bp.dresidual_out = c.residual ? d_dresidual.get() : nullptr;
  bp.h = c.residual ? d_residual_out.get() : d_x.get();
  bp.weight = c.weight ? d_weight.get() : nullptr;
  bp.mean = c.rms ? nullptr : static_cast<const float*>(d_mean.get());
  bp.rstd = static_cast<const float*>(d_rstd.get());
  bp.dx = d_dx.get();
  bp.dweight = c.weight ? d_dweight.get() : nullptr;
  bp.dbias = has_bias ? d_dbias.get() : nullptr;
  bp.rows = rows;
  bp.cols = cols;
  bp.weight_offset = c.weight_offset;
  bp.rms = c.rms;
  bp.x_dtype = c.x;
  bp.weight_dtype = c.w;
  bp.out_dtype = c.out;
  const int64_t workspace_floats = transfuse::cuda::norm_backward_workspace_floats(bp);
  if (workspace_floats < 0) {
    check.fail("negative backward workspace size");
    return false;
  }
  DeviceBuffer workspace(static_cast<size_t>(workspace_floats) * 4);
  workspace.poison();
  transfuse::cuda::norm_backward_launch(bp, static_cast<float*>(workspace.get()), nullptr);
  check_cuda(cudaGetLastError(), "norm_backward_launch");
  check_cuda(cudaDeviceSynchronize(), "norm_backward kernels");

  const std::vector<float> dx = decode(d_dx.download(), c.x);
  std::vector<double> dweight_ref(cols, 0.0), dweight_mag(cols, 0.0);
  std::vector<double> dbias_ref(cols, 0.0), dbias_mag(cols, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    const float* hr = &h[row * cols];
    const float* dyr = &dy[row * cols];
    const double m = mean[row], rs = rstd[row];
    double sum_g = 0, sum_g_xhat = 0, abs_g = 0, abs_g_xhat = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const double x_hat = (hr[j] - m) * rs;
      const double g = dyr[j] * scale_of(j);
      sum_g += g;
      sum_g_xhat += g * x_hat;
      abs_g += std::fabs(g);
      abs_g_xhat += std::fabs(g * x_hat);
      dweight_ref[j] += dyr[j] * x_hat;
      dweight_mag[j] += std::fabs(dyr[j] * x_hat);
      dbias_ref[j] += dyr[j];
      dbias_mag[j] += std::fabs(dyr[j]);
    }
    const double mean_g = c.rms ? 0.0 : sum_g / cols;
    const double mean_g_xhat = sum_g_xhat / cols;
    const double mean_abs_g = c.rms ? 0.0 : abs_g / cols;
    const double mean_abs_g_xhat = abs_g_xhat / cols;
    for (int64_t j = 0; j < cols; ++j) {
      const double x_hat = (hr[j] - m) * rs;
      const double g = dyr[j] * scale_of(j);
      const double dres = c.residual ? dresidual[row * cols + j] : 0.0;
      const double want = rs * (g - mean_g - x_hat * mean_g_xhat) + dres;
      const double magnitude = rs * (std::fabs(g) + mean_abs_g + std::fabs(x_hat) * mean_abs_g_xhat) + std::fabs(dres);
      check.expect_near("dx", row * cols + j, dx[row * cols + j], want,
                        kRelTol * magnitude + rounding_tolerance(c.x, want));
    }
  }
  if (c.weight) {
    const std::vector<float> dweight = decode(d_dweight.download(), c.w);
    for (int64_t j = 0; j < cols; ++j) {
      check.expect_near("dweight", j, dweight[j], dweight_ref[j],
                        kRelTol * dweight_mag[j] + rounding_tolerance(c.w, dweight_ref[j]));
    }
  }
  if (has_bias) {
    const std::vector<float> dbias = decode(d_dbias.download(), c.w);
    for (int64_t j = 0; j < cols; ++j) {
      check.expect_near("dbias", j, dbias[j], dbias_ref[j],
                        kRelTol * dbias_mag[j] + rounding_tolerance(c.w, dbias_ref[j]));
    }
  }
  return check.passed();
}

// The flavours of norm the sweeps run: LayerNorm bare / with everything, RMSNorm llama / gemma.
std::vector<Case> flavours() {
  std::vector<Case> result;
  Case layer_bare;
  layer_bare.mean_offset = 3.f;
  result.push_back(layer_bare);
  Case layer_full;
  layer_full.residual = layer_full.weight = layer_full.bias = true;
  layer_full.mean_offset = 3.f;
  result.push_back(layer_full);
  Case layer_bias_only;
  layer_bias_only.bias = true;
  result.push_back(layer_bias_only);
  Case rms_llama;
  rms_llama.rms = true;
  rms_llama.weight = true;
  rms_llama.eps = 1e-6f;
  result.push_back(rms_llama);
  Case rms_gemma;
  rms_gemma.rms = true;
  rms_gemma.weight = true;
  rms_gemma.residual = true;
  rms_gemma.weight_offset = 1.f;
  rms_gemma.eps = 1e-6f;
  result.push_back(rms_gemma);
  return result;
}

std::vector<Case> all_cases() {
  const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
  std::vector<Case> cases;

  // fp32 over every shape of the brief, every flavour.
  for (int64_t cols : {1, 7, 100, 1000, 4096, 8192, 65536}) {
    for (int64_t rows : {0, 1, 3, 37, 1000}) {
      for (Case c : flavours()) {
        c.rows = rows;
        c.cols = cols;
        cases.push_back(c);
      }
    }
  }

  // Every (x, weight, out, normalized) dtype combination, LayerNorm and RMSNorm, over shapes that
  // reach every kernel variant (warp / block rows, 1 to 8 vectors a thread, streaming, tiles).
  for (DType x : dtypes) {
    for (DType w : dtypes) {
      for (DType out : dtypes) {
        for (DType normalized : dtypes) {
          for (int64_t cols : {7, 100, 1000, 2048, 4096, 8192, 16384, 65536}) {
            const int64_t rows = cols >= 16384 ? 5 : 37;
            Case layer;
            layer.rows = rows;
            layer.cols = cols;
            layer.residual = layer.weight = layer.bias = true;
            layer.mean_offset = 1.f;
            layer.x = x;
            layer.w = w;
            layer.out = out;
            layer.normalized = normalized;
            cases.push_back(layer);
            Case rms = layer;
            rms.rms = true;
            rms.bias = false;
            rms.mean_offset = 0.f;
            rms.weight_offset = 1.f;
            rms.eps = 1e-6f;
            cases.push_back(rms);
          }
        }
      }
    }
  }

  // 16-bit inputs over the same shapes (one dtype combination each; the fp32 sweep above already
  // runs the 65536 x 1000 giant, whose host reference is the slow part).
  for (DType x : {DType::f16, DType::bf16}) {
    for (int64_t cols : {1, 7, 100, 1000, 4096, 8192, 65536}) {
      for (int64_t rows : {0, 1, 3, 37, 1000}) {
        if (rows * cols > (int64_t(1) << 23)) continue;
        for (Case c : flavours()) {
          c.rows = rows;
          c.cols = cols;
          c.x = c.w = c.out = c.normalized = x;
          c.mean_offset = std::min(c.mean_offset, 1.f);
          cases.push_back(c);
        }
      }
    }
  }

  // Unaligned pointers (scalar paths) and many rows (grid-stride loops, many partial sums).
  for (DType x : dtypes) {
    for (int64_t cols : {1000, 4096, 65536}) {
      for (Case c : flavours()) {
        c.rows = 37;
        c.cols = cols;
        c.x = c.w = c.out = c.normalized = x;
        c.mean_offset = std::min(c.mean_offset, 1.f);
        c.misaligned = true;
        cases.push_back(c);
      }
    }
    for (int64_t cols : {64, 256, 3072}) {
      for (Case c : flavours()) {
        c.rows = 200000 / (cols / 64);
        c.cols = cols;
        c.x = c.w = c.out = c.normalized = x;
        c.mean_offset = std::min(c.mean_offset, 1.f);
        cases.push_back(c);
      }
    }
  }
  return cases;
}

}  // namespace

int main() {
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    cudaGetLastError();
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  // The cases on every core: their float64 host reference, not the GPU, takes the time (over
  // 3 minutes on one core of the H200 machine). Case i has seed i + 1 whichever thread runs it.
  const std::vector<Case> cases = all_cases();
  std::atomic<size_t> next{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> workers(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  for (auto& worker : workers) {
    worker = std::thread([&] {
      for (size_t i = next++; i < cases.size(); i = next++) {
        if (!run_case(cases[i], i + 1)) ++failed;
      }
    });
  }
  for (auto& worker : workers) worker.join();
  std::printf("%d passed, %d failed\n", static_cast<int>(cases.size()) - failed.load(), failed.load());
  return failed == 0 ? 0 : 1;
}
