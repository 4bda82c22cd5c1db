// Torch-free unit test of the CPU norm kernels (cpu/norm.cpp) against a double-precision reference
// written out here, for LayerNorm and RMSNorm, with and without residual / weight / bias /
// weight_offset, over several shapes, dtype combinations and thread counts. Every output buffer is
// filled with NaN before the kernel runs, so an element the kernel forgets to write fails.
//
//   g++ -std=c++17 -O3 -fopenmp -I csrc csrc/tests/test_norm_cpu.cpp csrc/cpu/norm.cpp -o test_norm_cpu
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/norm.h"

using transfuse::DType;

namespace {

// ------------------------------------------------------------------------------------------------
// Reference dtype conversions, written independently of the kernel's (frexp / nearbyint instead of
// bit tricks). Both round to nearest even, as torch's .to(float16 / bfloat16) does.
// ------------------------------------------------------------------------------------------------

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// Encodes |value| (finite) with `mantissa_bits` stored mantissa bits, exponent bias `bias`, min
// normal exponent 1 - bias, max finite exponent `max_exponent`; returns the unsigned bit pattern.
uint32_t encode_magnitude(double magnitude, int mantissa_bits, int bias, int max_exponent,
                          uint32_t inf_bits) {
  const int min_exponent = 1 - bias;
  int binary_exponent;
  std::frexp(magnitude, &binary_exponent);  // magnitude = m * 2^binary_exponent, m in [0.5, 1)
  int exponent = binary_exponent - 1;       // magnitude = s * 2^exponent, s in [1, 2)
  if (magnitude == 0.0 || exponent < min_exponent) {
    // Subnormal range: an integer count of 2^(min_exponent - mantissa_bits).
    const double units = std::nearbyint(std::ldexp(magnitude, mantissa_bits - min_exponent));
    return uint32_t(units);  // units == 2^mantissa_bits encodes the smallest normal exactly
  }
  double significand = std::nearbyint(std::ldexp(magnitude, mantissa_bits - exponent));
  if (significand == std::ldexp(1.0, mantissa_bits + 1)) {
    significand /= 2;
    exponent += 1;
  }
  if (exponent > max_exponent) return inf_bits;
  return uint32_t(exponent + bias) << mantissa_bits | (uint32_t(significand) - (1u << mantissa_bits));
}

uint16_t reference_float_to_f16(float value) {
  const uint16_t sign = (bits_of(value) >> 16) & 0x8000u;
  if (std::isnan(value)) return sign | 0x7E00u;
  if (std::isinf(value)) return sign | 0x7C00u;
  return sign | uint16_t(encode_magnitude(std::fabs(double(value)), 10, 15, 15, 0x7C00u));
}

float reference_f16_to_float(uint16_t bits) {
  const bool negative = bits & 0x8000u;
  const int exponent_field = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  double magnitude;
  if (exponent_field == 0x1F) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent_field == 0) {
    magnitude = std::ldexp(double(mantissa), -24);
  } else {
    magnitude = std::ldexp(double(1024 + mantissa), exponent_field - 25);
  }
  return float(negative ? -magnitude : magnitude);
}

uint16_t reference_float_to_bf16(float value) {
  const uint16_t sign = (bits_of(value) >> 16) & 0x8000u;
  if (std::isnan(value)) return sign | 0x7FC0u;
  if (std::isinf(value)) return sign | 0x7F80u;
  return sign | uint16_t(encode_magnitude(std::fabs(double(value)), 7, 127, 127, 0x7F80u));
}

float reference_bf16_to_float(uint16_t bits) { return float_from_bits(uint32_t(bits) << 16); }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
  }
  return "?";
}

// Unit roundoff (half an ulp, relative) of a dtype's rounding.
double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::f32: return 0.0;  // fp32 error is covered by the fp32 tolerance
    case DType::f16: return std::ldexp(1.0, -11);
    case DType::bf16: return std::ldexp(1.0, -8);
  }
  return 0.0;
}

// Absolute rounding error near zero: half the smallest subnormal of a dtype.
double subnormal_roundoff(DType dtype) {
  switch (dtype) {
    case DType::f32: return 0.0;
    case DType::f16: return std::ldexp(1.0, -25);
    case DType::bf16: return std::ldexp(1.0, -134);
  }
  return 0.0;
}

// float -> dtype -> float
float round_to(DType dtype, float value) {
  switch (dtype) {
    case DType::f32: return value;
    case DType::f16: return reference_f16_to_float(reference_float_to_f16(value));
    case DType::bf16: return reference_bf16_to_float(reference_float_to_bf16(value));
  }
  return value;
}

// ------------------------------------------------------------------------------------------------
// A flat buffer of one dtype
// ------------------------------------------------------------------------------------------------

struct Buffer {
  DType dtype = DType::f32;
  std::vector<unsigned char> bytes;

  Buffer() = default;
  Buffer(DType t, int64_t count) : dtype(t), bytes(size_t(count) * transfuse::dtype_size(t)) {}

  int64_t size() const { return int64_t(bytes.size()) / transfuse::dtype_size(dtype); }
  void* data() { return bytes.empty() ? nullptr : bytes.data(); }
  const void* data() const { return bytes.empty() ? nullptr : bytes.data(); }

  uint16_t bits16(int64_t i) const {
    uint16_t bits;
    std::memcpy(&bits, bytes.data() + i * 2, 2);
    return bits;
  }

  float get(int64_t i) const {
    switch (dtype) {
      case DType::f32: {
        float value;
        std::memcpy(&value, bytes.data() + i * 4, 4);
        return value;
      }
      case DType::f16: return reference_f16_to_float(bits16(i));
      case DType::bf16: return reference_bf16_to_float(bits16(i));
    }
    return 0.f;
  }

  // Stores value rounded to the dtype.
  void set(int64_t i, float value) {
    uint16_t bits = 0;
    switch (dtype) {
      case DType::f32: std::memcpy(bytes.data() + i * 4, &value, 4); return;
      case DType::f16: bits = reference_float_to_f16(value); break;
      case DType::bf16: bits = reference_float_to_bf16(value); break;
    }
    std::memcpy(bytes.data() + i * 2, &bits, 2);
  }

  void set_bits16(int64_t i, uint16_t bits) { std::memcpy(bytes.data() + i * 2, &bits, 2); }

  void poison() {
    for (int64_t i = 0; i < size(); ++i) set(i, NAN);
  }
};

// The values of a buffer, as doubles.
std::vector<double> values_of(const Buffer& buffer) {
  std::vector<double> values(size_t(buffer.size()));
  for (int64_t i = 0; i < buffer.size(); ++i) values[i] = buffer.get(i);
  return values;
}

Buffer random_buffer(DType dtype, int64_t count, std::mt19937_64& rng, float low, float high) {
  Buffer buffer(dtype, count);
  std::uniform_real_distribution<float> uniform(low, high);
  for (int64_t i = 0; i < count; ++i) buffer.set(i, uniform(rng));
  return buffer;
}

// ------------------------------------------------------------------------------------------------
// Checking
// ------------------------------------------------------------------------------------------------

struct Failures {
  std::vector<std::string> messages;
  void add(const std::string& message) { messages.push_back(message); }
};

// max |actual - expected| <= tolerance(j) for every element; NaN in actual fails.
template <typename Expected, typename Tolerance>
void check_close(Failures& failures, const char* what, const Buffer& actual, int64_t count,
                 Expected expected, Tolerance tolerance) {
  for (int64_t i = 0; i < count; ++i) {
    const double got = actual.get(i);
    const double want = expected(i);
    const double error = std::fabs(got - want);
    if (!(error <= tolerance(i))) {  // also catches NaN
      char message[256];
      std::snprintf(message, sizeof(message), "%s[%lld]: got %.9g, want %.9g (error %.3g > tolerance %.3g)",
                    what, (long long)i, got, want, error, tolerance(i));
      failures.add(message);
      return;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// One forward + backward case
// ------------------------------------------------------------------------------------------------

struct DTypes {
  DType x, weight, normalized, out;
};

struct Case {
  bool rms = false;
  bool residual = false;
  bool weight = false;
  bool bias = false;
  float weight_offset = 0.f;
  int64_t rows = 0;
  int64_t cols = 0;
  DTypes dtypes;
  int threads = 1;

  std::string describe() const {
    char text[256];
    std::snprintf(text, sizeof(text),
                  "%s rows=%lld cols=%lld residual=%d weight=%d bias=%d offset=%g x=%s w=%s norm=%s out=%s threads=%d",
                  rms ? "RMSNorm" : "LayerNorm", (long long)rows, (long long)cols, residual, weight, bias,
                  weight_offset, dtype_name(dtypes.x), dtype_name(dtypes.weight),
                  dtype_name(dtypes.normalized), dtype_name(dtypes.out), threads);
    return text;
  }
};

std::vector<std::string> run_case(const Case& c, std::mt19937_64& rng) {
  Failures failures;
  const int64_t rows = c.rows, cols = c.cols, n = rows * cols;
  const double eps = 1e-5;

  // Inputs; x gets a per-row offset so the mean subtraction matters.
  Buffer x(c.dtypes.x, n);
  {
    std::uniform_real_distribution<float> values(-2.f, 2.f), offsets(-3.f, 3.f);
    for (int64_t row = 0; row < rows; ++row) {
      const float offset = offsets(rng);
      for (int64_t j = 0; j < cols; ++j) x.set(row * cols + j, offset + values(rng));
    }
  }
  Buffer residual = c.residual ? random_buffer(c.dtypes.x, n, rng, -1.f, 1.f) : Buffer();
  Buffer weight = c.weight ? random_buffer(c.dtypes.weight, cols, rng, -1.5f, 1.5f) : Buffer();
  Buffer bias = c.bias ? random_buffer(c.dtypes.weight, cols, rng, -0.5f, 0.5f) : Buffer();

  // ---------------- forward ----------------
  Buffer y(c.dtypes.out, n), residual_out(c.dtypes.x, c.residual ? n : 0);
  Buffer mean(DType::f32, c.rms ? 0 : rows), rstd(DType::f32, rows);
  y.poison();
  residual_out.poison();
  mean.poison();
  rstd.poison();

  transfuse::NormForwardParams fp;
  fp.x = x.data();
  fp.residual = c.residual ? residual.data() : nullptr;
  fp.weight = c.weight ? weight.data() : nullptr;
  fp.bias = c.bias ? bias.data() : nullptr;
  fp.y = y.data();
  fp.residual_out = c.residual ? residual_out.data() : nullptr;
  fp.mean = c.rms ? nullptr : static_cast<float*>(mean.data());
  fp.rstd = static_cast<float*>(rstd.data());
  fp.rows = rows;
  fp.cols = cols;
  fp.eps = float(eps);
  fp.weight_offset = c.weight_offset;
  fp.rms = c.rms;
  fp.x_dtype = c.dtypes.x;
  fp.weight_dtype = c.dtypes.weight;
  fp.normalized_dtype = c.dtypes.normalized;
  fp.out_dtype = c.dtypes.out;
  fp.num_threads = c.threads;
  transfuse::cpu::norm_forward(fp);

  // Reference forward in double. h = round_x(x + residual) with the add in fp32, as torch does.
  std::vector<double> h(n), ref_y(n), ref_mean(rows), ref_rstd(rows), row_max_h(rows);
  std::vector<float> h_rounded(n);
  const std::vector<double> x_values = values_of(x), residual_values = values_of(residual);
  for (int64_t i = 0; i < n; ++i) {
    h_rounded[i] = c.residual ? round_to(c.dtypes.x, float(x_values[i]) + float(residual_values[i]))
                              : float(x_values[i]);
    h[i] = h_rounded[i];
  }
  std::vector<double> scale(cols, 1.0), shift(cols, 0.0);
  for (int64_t j = 0; j < cols; ++j) {
    if (c.weight) scale[j] = double(c.weight_offset) + weight.get(j);
    if (c.bias) shift[j] = bias.get(j);
  }
  for (int64_t row = 0; row < rows; ++row) {
    const double* hr = h.data() + row * cols;
    double mu = 0, var = 0, max_h = 0;
    if (!c.rms) {
      for (int64_t j = 0; j < cols; ++j) mu += hr[j];
      mu /= double(cols);
    }
    for (int64_t j = 0; j < cols; ++j) {
      var += (hr[j] - mu) * (hr[j] - mu);
      max_h = std::max(max_h, std::fabs(hr[j]));
    }
    var /= double(cols);
    ref_mean[row] = mu;
    ref_rstd[row] = 1.0 / std::sqrt(var + eps);
    row_max_h[row] = max_h;
    for (int64_t j = 0; j < cols; ++j) {
      double x_hat = (hr[j] - mu) * ref_rstd[row];
      if (c.dtypes.normalized != DType::f32) x_hat = round_to(c.dtypes.normalized, float(x_hat));
      ref_y[row * cols + j] = x_hat * scale[j] + shift[j];
    }
  }

  if (c.residual) {  // residual_out is bit-exact: the same fp32 add, the same rounding
    for (int64_t i = 0; i < n; ++i) {
      if (bits_of(residual_out.get(i)) != bits_of(h_rounded[i])) {
        char message[160];
        std::snprintf(message, sizeof(message), "residual_out[%lld]: got %.9g, want %.9g", (long long)i,
                      residual_out.get(i), h_rounded[i]);
        failures.add(message);
        break;
      }
    }
  }
  if (!c.rms) {
    check_close(failures, "mean", mean, rows, [&](int64_t r) { return ref_mean[r]; },
                [&](int64_t r) { return 1e-5 * std::max(1.0, row_max_h[r]); });
  }
  check_close(failures, "rstd", rstd, rows, [&](int64_t r) { return ref_rstd[r]; },
              [&](int64_t r) { return 1e-5 * ref_rstd[r]; });
  {
    double max_ref = 0, max_unrounded = 0;
    for (int64_t i = 0; i < n; ++i) max_ref = std::max(max_ref, std::fabs(ref_y[i]));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = i % cols;
      const double x_hat = (h[i] - ref_mean[i / cols]) * ref_rstd[i / cols];
      max_unrounded = std::max(max_unrounded, std::fabs(x_hat * scale[j]));
    }
    const double scale_of_errors = std::max(1.0, max_ref);
    // fp32 error, plus: x_hat rounded on the other side of a tie (one ulp of normalized_dtype),
    // plus the final rounding to out_dtype (half an ulp).
    const double tolerance = 1e-5 * scale_of_errors +
                             2.0 * unit_roundoff(c.dtypes.normalized) * std::max(1.0, max_unrounded) +
                             1.01 * unit_roundoff(c.dtypes.out) * scale_of_errors;
    check_close(failures, "y", y, n, [&](int64_t i) { return ref_y[i]; }, [&](int64_t) { return tolerance; });
  }

  // ---------------- backward ----------------
  // Inputs: dy (out dtype), h (x dtype), the saved statistics (the reference's, as fp32, given to
  // both sides), dresidual_out (x dtype) whenever there is a residual.
  Buffer dy = random_buffer(c.dtypes.out, n, rng, -1.f, 1.f);
  Buffer h_input(c.dtypes.x, n);
  for (int64_t i = 0; i < n; ++i) h_input.set(i, h_rounded[i]);
  Buffer dresidual_out = c.residual ? random_buffer(c.dtypes.x, n, rng, -1.f, 1.f) : Buffer();
  std::vector<float> saved_mean(rows), saved_rstd(rows);
  for (int64_t row = 0; row < rows; ++row) {
    saved_mean[row] = float(ref_mean[row]);
    saved_rstd[row] = float(ref_rstd[row]);
  }

  Buffer dx(c.dtypes.x, n), dweight(c.dtypes.weight, c.weight ? cols : 0), dbias(c.dtypes.weight, c.bias ? cols : 0);
  dx.poison();
  dweight.poison();
  dbias.poison();

  transfuse::NormBackwardParams bp;
  bp.dy = dy.data();
  bp.dresidual_out = c.residual ? dresidual_out.data() : nullptr;
  bp.h = h_input.data();
  bp.weight = c.weight ? weight.data() : nullptr;
  bp.mean = c.rms ? nullptr : saved_mean.data();
  bp.rstd = saved_rstd.data();
  bp.dx = dx.data();
  bp.dweight = c.weight ? dweight.data() : nullptr;
  bp.dbias = c.bias ? dbias.data() : nullptr;
  bp.rows = rows;
  bp.cols = cols;
  bp.weight_offset = c.weight_offset;
  bp.rms = c.rms;
  bp.x_dtype = c.dtypes.x;
  bp.weight_dtype = c.dtypes.weight;
  bp.out_dtype = c.dtypes.out;
  bp.num_threads = c.threads;
  const int64_t workspace_floats = transfuse::cpu::norm_backward_workspace_floats(bp);
  std::vector<float> workspace(size_t(std::max<int64_t>(workspace_floats, 0)), NAN);
  transfuse::cpu::norm_backward(bp, workspace.empty() ? nullptr : workspace.data());

  std::vector<double> ref_dx(n), ref_dweight(cols, 0.0), ref_dbias(cols, 0.0), abs_dweight(cols, 0.0),
      abs_dbias(cols, 0.0);
  const std::vector<double> dy_values = values_of(dy), dresidual_values = values_of(dresidual_out);
  double max_scaled_g = 0;  // max of rstd * |g|: the size of the terms that cancel in dx
  for (int64_t row = 0; row < rows; ++row) {
    const double mu = c.rms ? 0.0 : saved_mean[row], rs = saved_rstd[row];
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t i = row * cols + j;
      const double x_hat = (h[i] - mu) * rs, g = dy_values[i] * scale[j];
      sum_g += g;
      sum_g_xhat += g * x_hat;
      ref_dweight[j] += dy_values[i] * x_hat;
      abs_dweight[j] += std::fabs(dy_values[i] * x_hat);
      ref_dbias[j] += dy_values[i];
      abs_dbias[j] += std::fabs(dy_values[i]);
      max_scaled_g = std::max(max_scaled_g, rs * std::fabs(g));
    }
    const double mean_g = c.rms ? 0.0 : sum_g / double(cols), mean_g_xhat = sum_g_xhat / double(cols);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t i = row * cols + j;
      const double x_hat = (h[i] - mu) * rs, g = dy_values[i] * scale[j];
      ref_dx[i] = rs * (g - mean_g - x_hat * mean_g_xhat) + (c.residual ? dresidual_values[i] : 0.0);
    }
  }
  {
    double max_ref = 0;
    for (int64_t i = 0; i < n; ++i) max_ref = std::max(max_ref, std::fabs(ref_dx[i]));
    // dx is a difference of terms of size rstd * |g| (large when cols = 1: rstd = 1/sqrt(eps)),
    // so its fp32 error scales with them as well as with dx itself.
    const double scale_of_errors = std::max({1.0, max_ref, max_scaled_g});
    const double tolerance = 1e-5 * scale_of_errors + 1.01 * unit_roundoff(c.dtypes.x) * scale_of_errors;
    check_close(failures, "dx", dx, n, [&](int64_t i) { return ref_dx[i]; }, [&](int64_t) { return tolerance; });
  }
  // Sums over rows: fp32 accumulation error grows with the number of rows summed.
  const double per_row = 2e-6 * double(rows + 1);
  const double weight_rounding = 1.01 * unit_roundoff(c.dtypes.weight);
  const double weight_subnormal = 1.01 * subnormal_roundoff(c.dtypes.weight);
  if (c.weight) {
    check_close(failures, "dweight", dweight, cols, [&](int64_t j) { return ref_dweight[j]; },
                [&](int64_t j) { return (per_row + weight_rounding) * (abs_dweight[j] + 1e-6) + weight_subnormal; });
  }
  if (c.bias) {
    check_close(failures, "dbias", dbias, cols, [&](int64_t j) { return ref_dbias[j]; },
                [&](int64_t j) { return (per_row + weight_rounding) * (abs_dbias[j] + 1e-6) + weight_subnormal; });
  }
  return failures.messages;
}

// ------------------------------------------------------------------------------------------------
// Exhaustive conversion check: every f16 / bf16 bit pattern as x, plus a random 16-bit residual;
// residual_out = round_x(x + residual) must match the reference rounding bit for bit (NaN: any NaN).
// cols is odd so every row also goes through the conversions' tails.
// ------------------------------------------------------------------------------------------------

std::vector<std::string> run_conversion_case(DType dtype, std::mt19937_64& rng) {
  Failures failures;
  const int64_t cols = 251, rows = 262, n = rows * cols;  // n >= 65536
  Buffer x(dtype, n), residual(dtype, n), y(dtype, n), residual_out(dtype, n);
  std::vector<float> mean(rows), rstd(rows);
  std::uniform_int_distribution<int> any_bits(0, 0xFFFF);
  for (int64_t i = 0; i < n; ++i) {
    x.set_bits16(i, uint16_t(i & 0xFFFF));
    // Half the residuals are small (exercising subnormal sums and ties), half arbitrary.
    const uint16_t bits = uint16_t(any_bits(rng));
    residual.set_bits16(i, (i & 1) ? bits : uint16_t(bits & 0x83FF));
  }
  residual_out.poison();

  transfuse::NormForwardParams fp;
  fp.x = x.data();
  fp.residual = residual.data();
  fp.y = y.data();
  fp.residual_out = residual_out.data();
  fp.mean = mean.data();
  fp.rstd = rstd.data();
  fp.rows = rows;
  fp.cols = cols;
  fp.x_dtype = fp.weight_dtype = fp.normalized_dtype = fp.out_dtype = dtype;
  fp.num_threads = 2;
  transfuse::cpu::norm_forward(fp);

  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float want = round_to(dtype, x.get(i) + residual.get(i));
    const float got = residual_out.get(i);
    const bool same = std::isnan(want) ? std::isnan(got) : bits_of(want) == bits_of(got);
    if (!same && mismatches++ == 0) {
      char message[200];
      std::snprintf(message, sizeof(message), "%s conversion: x bits 0x%04x + residual bits 0x%04x: got %.9g, want %.9g",
                    dtype_name(dtype), x.bits16(i), residual.bits16(i), got, want);
      failures.add(message);
    }
  }
  // Also the 16 -> 32 direction alone: the reference decoder against bit patterns of known values.
  if (dtype == DType::f16) {
    const struct { uint16_t bits; float value; } known[] = {
        {0x0001, 5.9604644775390625e-08f}, {0x03FF, 6.0975551605224609e-05f}, {0x0400, 6.103515625e-05f},
        {0x3C00, 1.f}, {0x7BFF, 65504.f}, {0xC000, -2.f}, {0x7C00, INFINITY}, {0xFC00, -INFINITY}};
    for (const auto& k : known) {
      if (reference_f16_to_float(k.bits) != k.value) failures.add("reference f16 decoder is wrong");
    }
  }
  return failures.messages;
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  int passed = 0, failed = 0;
  auto record = [&](const std::string& name, const std::vector<std::string>& messages) {
    if (messages.empty()) {
      ++passed;
      return;
    }
    ++failed;
    if (failed <= 20) {
      std::printf("FAILED: %s\n", name.c_str());
      for (const std::string& message : messages) std::printf("    %s\n", message.c_str());
    }
  };

  record("f16 conversions", run_conversion_case(DType::f16, rng));
  record("bf16 conversions", run_conversion_case(DType::bf16, rng));

  // {x, weight, normalized, out}: the HF casting modes plus some arbitrary mixes.
  const DTypes dtype_sets[] = {
      {DType::f32, DType::f32, DType::f32, DType::f32},      // fp32
      {DType::bf16, DType::bf16, DType::bf16, DType::bf16},  // llama bf16
      {DType::f16, DType::f16, DType::f16, DType::f16},      // llama f16
      {DType::bf16, DType::f32, DType::bf16, DType::f32},    // llama, bf16 input, fp32 weight
      {DType::f16, DType::f32, DType::f32, DType::f16},      // gemma / LayerNorm f16 with fp32 params
      {DType::f32, DType::bf16, DType::bf16, DType::bf16},   // t5, bf16 weight
      {DType::bf16, DType::f16, DType::f16, DType::f32},     // arbitrary mix
  };
  const int64_t col_counts[] = {1, 7, 100, 1000, 4096, 8192};
  const int64_t row_counts[] = {0, 1, 3, 37};
  const int thread_counts[] = {1, 2, 3};

  int case_index = 0;
  for (const DTypes& dtypes : dtype_sets) {
    for (bool rms : {false, true}) {
      for (bool residual : {false, true}) {
        for (int weight_mode = 0; weight_mode < 3; ++weight_mode) {  // none, weight, weight + offset
          for (bool bias : {false, true}) {
            if (rms && bias) continue;
            for (int64_t cols : col_counts) {
              for (int64_t rows : row_counts) {
                Case c;
                c.rms = rms;
                c.residual = residual;
                c.weight = weight_mode > 0;
                c.weight_offset = weight_mode == 2 ? 1.f : 0.f;
                c.bias = bias;
                c.rows = rows;
                c.cols = cols;
                c.dtypes = dtypes;
                c.threads = thread_counts[case_index++ % 3];
                record(c.describe(), run_case(c, rng));
              }
            }
          }
        }
      }
    }
  }

  // A few calls whose tensors exceed a typical last-level cache (the kernel then writes its outputs
  // with non-temporal stores); cols is odd so most rows start unaligned.
  const struct { bool rms; DTypes dtypes; int threads; } large_cases[] = {
      {false, {DType::f32, DType::f32, DType::f32, DType::f32}, 2},
      {true, {DType::bf16, DType::bf16, DType::bf16, DType::bf16}, 3},
      {false, {DType::f16, DType::f32, DType::f32, DType::f16}, 2},
  };
  for (const auto& large : large_cases) {
    Case c;
    c.rms = large.rms;
    c.residual = true;
    c.weight = true;
    c.bias = !large.rms;
    c.rows = 1030;
    c.cols = 4099;
    c.dtypes = large.dtypes;
    c.threads = large.threads;
    record(c.describe(), run_case(c, rng));
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
