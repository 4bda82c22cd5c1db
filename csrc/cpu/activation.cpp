// CPU kernels of the bias + GELU epilogue and of act(gate) * up (SiLU or GELU). The math is
// stated in common/activation.h.
//
// Layout of the work: the [rows, cols] elements are cut into tiles of at most kTileCols columns
// of one row; OpenMP threads take contiguous runs of tiles (static schedule), so each thread
// walks one contiguous stretch of memory, reading x (and dy) once and writing y (or dx) once.
// fp32 tiles go straight from the inputs to the output in one loop; fp16 / bf16 tiles are
// converted into fp32 scratch (cpu/convert), z = x + bias rounded to the dtype (as eager's add),
// GELU in fp32, converted back once: all of it while the tile sits in L1.
//
// Why not std::erf / std::exp / std::tanh: they are libm calls, which GCC cannot vectorize.
// Instead, inline functions built from +, *, /, min / max, bit-mask selects and integer bit
// operations, which GCC vectorizes in the row loops; TRANSFUSE_MULTIVERSION compiles each loop
// for AVX-512, AVX2 and baseline x86-64 and the loader picks one. Errors below are measured in
// fp32 against double-precision libm on dense grids (/tmp harness: 6e7 points of z in [-30, 30];
// tests/test_activation.py checks 2^18 + 10 points of every backend against float64):
//   Phi(z) - 1/2 = z P(z^2) / Q(z^2), P, Q of degrees 5 / 4 fitted for this kernel (discrete
//       minimax by linear programming on [0, 5.2]: 7.5e-8 exact, plus Phi(-5.2) = 1e-7 where it
//       stops); z^2 is clamped at 5.2^2 and the result at +-1/2, so Phi is exactly 0 / 1 far out.
//       No exp, one division. |Phi error| <= 2.5e-7, so 1 - erf and 1 + erf are within 5e-7.
//       gelu(z) = z Phi(z): |error| <= 3.0e-7 * max(1, |z|); gelu'(z): <= 3.3e-7 * max(1, |z|).
//   exp(x) = 2^(x / ln 2): 2^y = 2^n 2^f, n = round(y) by the 1.5 * 2^23 trick and placed in the
//       exponent bits, 2^f (|f| <= 1/2) by a degree-5 minimax polynomial fitted for this kernel:
//       relative error <= 2.6e-7 on [-126, 127.5]; callers clamp y to [-126, 128] (2^128 = inf).
//   tanh mode through the logistic function, 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) (common/
//       activation.h): gelu within 1.2e-7 * max(1, |z|), gelu' within 2.2e-7 * max(1, |z|).
// Speed (AMD EPYC Zen 3, AVX2 clone, one thread, fp32 in L2): about 0.55 ns an element for
// approximate="none" (32 vector instructions per 8 elements, compute-bound), 0.6 for "tanh".
#include "activation.h"

#include "convert.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "multiversion.h"
#include "threads.h"

namespace transfuse::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Vectorizable scalar math (inlined into the row loops below)
// ------------------------------------------------------------------------------------------------

// condition ? if_true : if_false, as bit masks. GCC does not if-convert (so does not vectorize) a
// plain ?: whose arm holds a float operation, under its default -ftrapping-math (except with
// AVX-512 masks); both values are computed anyway.
inline float select(bool condition, float if_true, float if_false) {
  const uint32_t mask = 0u - uint32_t(condition);
  return float_from_bits((bits_of(if_true) & mask) | (bits_of(if_false) & ~mask));
}

// The bounds the math clamps to, passed to the row kernels as a run-time argument on purpose:
// std::min / std::max against a compile-time constant let GCC fold the next operation into the
// constant arm, which leaves a conditional float operation it then refuses to vectorize; against
// a run-time value they compile to one vminps / vmaxps (which keep a NaN operand x in
// std::max(x, bound), as C++ does). The values are always kClamps.
struct Clamps {
  float erf_w_max;  // z^2 bound of the Phi rational
  float half;       // 0.5: the rational's saturation
  float minus_half;
  float exp2_min;   // exponent range of exp2_clamped
  float exp2_max;
};
constexpr float kPhiZMax = 5.2f;  // the rational's fit interval: |z| <= kPhiZMax
constexpr Clamps kClamps = {kPhiZMax * kPhiZMax, 0.5f, -0.5f, -126.f, 128.f};

// Phi(z) - 1/2 = z P(z^2) / Q(z^2) for |z| <= kPhiZMax: a rational of degrees 5 / 4 in z^2 fitted
// here to 0.5 erf(z / sqrt 2) (discrete minimax by linear programming on 3000 points of
// [0, 5.2]): 7.5e-8 in exact arithmetic; Phi(-5.2) = 1.0e-7 is the price of stopping there. Past
// kPhiZMax, z^2 stays at kPhiZMax^2, so z P / Q grows linearly and is clamped to +-1/2: Phi is
// exactly 0 or 1 far out, so gelu(z) = z Phi(z) is exact there (0 for z << 0, z for z >> 0).
// All coefficients are positive except the last (tiny) one: the sums do not cancel.
constexpr float kPhiP0 = 3.9894128e-01f;
constexpr float kPhiP1 = 6.3594304e-02f;
constexpr float kPhiP2 = 6.3005444e-03f;
constexpr float kPhiP3 = 4.48135e-04f;
constexpr float kPhiP4 = 5.8540304e-06f;
constexpr float kPhiP5 = -1.7397598e-08f;
constexpr float kPhiQ1 = 3.2606e-01f;
constexpr float kPhiQ2 = 4.516002e-02f;
constexpr float kPhiQ3 = 3.4559537e-03f;
constexpr float kPhiQ4 = 1.5124501e-04f;

// Phi(z) - 1/2, in [-1/2, 1/2] (NaN stays NaN). Estrin's scheme (powers of w, then pairs): a
// shorter chain of dependent operations than Horner's, which lets more elements overlap.
inline float normal_cdf_centered(float z, const Clamps& c) {
  const float w = std::min(z * z, c.erf_w_max);
  const float w2 = w * w;
  const float w4 = w2 * w2;
  const float p = (kPhiP0 + kPhiP1 * w) + w2 * (kPhiP2 + kPhiP3 * w) + w4 * (kPhiP4 + kPhiP5 * w);
  const float q = (1.f + kPhiQ1 * w) + w2 * (kPhiQ2 + kPhiQ3 * w) + w4 * kPhiQ4;
  return std::max(std::min((z * p) / q, c.half), c.minus_half);
}

// 2^f for |f| <= 1/2: minimax polynomial of degree 5 fitted here (linear programming on 4001
// points), relative error 6.8e-8 in exact arithmetic, 2.5e-7 evaluated in fp32.
constexpr float kExp2C1 = 6.931471e-01f;
constexpr float kExp2C2 = 2.4022257e-01f;
constexpr float kExp2C3 = 5.5505417e-02f;
constexpr float kExp2C4 = 9.671092e-03f;
constexpr float kExp2C5 = 1.3295724e-03f;
constexpr float kRoundShifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr uint32_t kRoundShifterBits = 0x4B400000u;
constexpr float kLog2e = 1.44269504088896341f;

// 2^y for y in [-126, 128], clamped there by the caller (NaN passes; 2^128 = inf): y = n + f,
// n = round(y) by the 1.5 * 2^23 trick, 2^n built in the exponent bits.
inline float exp2_clamped(float y) {
  const float shifted = y + kRoundShifter;
  const float n = shifted - kRoundShifter;
  const float f = y - n;
  float p = kExp2C5;
  p = p * f + kExp2C4;
  p = p * f + kExp2C3;
  p = p * f + kExp2C2;
  p = p * f + kExp2C1;
  p = p * f + 1.f;
  // n sits in the low mantissa bits of `shifted` (same binade as kRoundShifter)
  const uint32_t biased_exponent = bits_of(shifted) - kRoundShifterBits + 127u;
  return p * float_from_bits(biased_exponent << 23);
}

// exp(-z^2 / 2), 0 once that is below 2^-126 (so that z exp(-z^2 / 2) -> 0 for every large z).
inline float gaussian(float z, const Clamps& c) {
  const float y = (-0.5f * kLog2e) * (z * z);
  return select(y < c.exp2_min, 0.f, exp2_clamped(std::max(y, c.exp2_min)));
}

constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// gelu(z) = z Phi(z)
inline float gelu_erf(float z, const Clamps& c) { return z * (0.5f + normal_cdf_centered(z, c)); }

// gelu'(z) = Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi)
inline float gelu_erf_grad(float z, const Clamps& c) {
  return (0.5f + normal_cdf_centered(z, c)) + z * (gaussian(z, c) * kInvSqrt2Pi);
}

// y2 = v / ln 2 = -2u / ln 2 = z * (kTanhC1 + kTanhC2 * z^2); 2 du/dz = kTanhD1 + kTanhD2 * z^2
constexpr float kTanhC1 = -2.f * kGeluTanhScale * kLog2e;
constexpr float kTanhC2 = -2.f * kGeluTanhScale * kGeluTanhCubic * kLog2e;
constexpr float kTanhD1 = 2.f * kGeluTanhScale;
constexpr float kTanhD2 = 6.f * kGeluTanhScale * kGeluTanhCubic;

// gelu_tanh(z) = z sigmoid(2u) = z / (1 + exp(v)): exp(v) overflows to inf for z << 0 (then
// z / inf = 0, as the limit) and is 2^-126 at most for z >> 0 (then z / 1 = z).
inline float gelu_tanh(float z, const Clamps& c) {
  const float y2 = z * (kTanhC1 + kTanhC2 * (z * z));
  return z / (1.f + exp2_clamped(std::min(std::max(y2, c.exp2_min), c.exp2_max)));
}

// gelu_tanh'(z) = s + z s (1 - s) 2 du/dz, s = sigmoid(2u), through m = exp(-|v|) <= 1:
// s = (v <= 0 ? 1 : m) / (1 + m), s (1 - s) = m / (1 + m)^2 (m flushed to 0 below 2^-126)
inline float gelu_tanh_grad(float z, const Clamps& c) {
  const float z2 = z * z;
  const float y2 = z * (kTanhC1 + kTanhC2 * z2);
  const float minus_abs = -std::abs(y2);
  const float m =
      select(minus_abs < c.exp2_min, 0.f, exp2_clamped(std::max(minus_abs, c.exp2_min)));
  const float r = 1.f / (1.f + m);
  const float s = select(y2 <= 0.f, 1.f, m) * r;
  return s + (z * (m * r * r)) * (kTanhD1 + kTanhD2 * z2);
}

// ------------------------------------------------------------------------------------------------
// Row kernels (fp32): y = gelu(x + bias) and dx = dy * gelu'(x + bias); bias may be null
// ------------------------------------------------------------------------------------------------

TRANSFUSE_MULTIVERSION
void gelu_erf_row(const float* __restrict x, const float* __restrict bias, float* __restrict y,
                  int64_t n, Clamps c) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) y[j] = gelu_erf(x[j] + bias[j], c);
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = gelu_erf(x[j], c);
  }
}

TRANSFUSE_MULTIVERSION
void gelu_tanh_row(const float* __restrict x, const float* __restrict bias, float* __restrict y,
                   int64_t n, Clamps c) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) y[j] = gelu_tanh(x[j] + bias[j], c);
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = gelu_tanh(x[j], c);
  }
}

TRANSFUSE_MULTIVERSION
void gelu_erf_grad_row(const float* __restrict dy, const float* __restrict x,
                       const float* __restrict bias, float* __restrict dx, int64_t n, Clamps c) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) dx[j] = dy[j] * gelu_erf_grad(x[j] + bias[j], c);
  } else {
    for (int64_t j = 0; j < n; ++j) dx[j] = dy[j] * gelu_erf_grad(x[j], c);
  }
}

TRANSFUSE_MULTIVERSION
void gelu_tanh_grad_row(const float* __restrict dy, const float* __restrict x,
                        const float* __restrict bias, float* __restrict dx, int64_t n, Clamps c) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) dx[j] = dy[j] * gelu_tanh_grad(x[j] + bias[j], c);
  } else {
    for (int64_t j = 0; j < n; ++j) dx[j] = dy[j] * gelu_tanh_grad(x[j], c);
  }
}

// silu(g) = g sigmoid(g) = g / (1 + exp(-g)): exp(-g) overflows to inf for g << 0 (then
// g / inf = -0, the limit) and is 2^-126 at most for g >> 0 (then g / 1 = g).
inline float sigmoid(float g, const Clamps& c) {
  const float y2 = -kLog2e * g;
  return 1.f / (1.f + exp2_clamped(std::min(std::max(y2, c.exp2_min), c.exp2_max)));
}

// The activations of act(gate) * up: value act(g) and derivative act'(g).
struct Silu {
  static float value(float g, const Clamps& c) { return g * sigmoid(g, c); }
  // silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
  static float grad(float g, const Clamps& c) {
    const float s = sigmoid(g, c);
    return s * (1.f + g * (1.f - s));
  }
};
struct GeluErf {
  static float value(float g, const Clamps& c) { return gelu_erf(g, c); }
  static float grad(float g, const Clamps& c) { return gelu_erf_grad(g, c); }
};
struct GeluTanh {
  static float value(float g, const Clamps& c) { return gelu_tanh(g, c); }
  static float grad(float g, const Clamps& c) { return gelu_tanh_grad(g, c); }
};

// y = act(g) * u (inlined into each multiversioned row kernel below, where it vectorizes)
template <class Act>
inline void gated_mul_loop(const float* __restrict g, const float* __restrict u,
                           float* __restrict y, int64_t n, const Clamps& c) {
  for (int64_t j = 0; j < n; ++j) y[j] = Act::value(g[j], c) * u[j];
}

// dup = dy act(g), dgate = dy u act'(g)
template <class Act>
inline void gated_mul_grad_loop(const float* __restrict dy, const float* __restrict g,
                                const float* __restrict u, float* __restrict dg,
                                float* __restrict du, int64_t n, const Clamps& c) {
  for (int64_t j = 0; j < n; ++j) {
    du[j] = dy[j] * Act::value(g[j], c);
    dg[j] = (dy[j] * u[j]) * Act::grad(g[j], c);
  }
}

using GatedMulRow = void (*)(const float*, const float*, float*, int64_t, Clamps);
using GatedMulGradRow = void (*)(const float*, const float*, const float*, float*, float*,
                                 int64_t, Clamps);

TRANSFUSE_MULTIVERSION
void silu_mul_row(const float* __restrict g, const float* __restrict u, float* __restrict y,
                  int64_t n, Clamps c) {
  gated_mul_loop<Silu>(g, u, y, n, c);
}

TRANSFUSE_MULTIVERSION
void gelu_mul_row(const float* __restrict g, const float* __restrict u, float* __restrict y,
                  int64_t n, Clamps c) {
  gated_mul_loop<GeluErf>(g, u, y, n, c);
}

TRANSFUSE_MULTIVERSION
void gelu_tanh_mul_row(const float* __restrict g, const float* __restrict u, float* __restrict y,
                       int64_t n, Clamps c) {
  gated_mul_loop<GeluTanh>(g, u, y, n, c);
}

TRANSFUSE_MULTIVERSION
void silu_mul_grad_row(const float* __restrict dy, const float* __restrict g,
                       const float* __restrict u, float* __restrict dg, float* __restrict du,
                       int64_t n, Clamps c) {
  gated_mul_grad_loop<Silu>(dy, g, u, dg, du, n, c);
}

TRANSFUSE_MULTIVERSION
void gelu_mul_grad_row(const float* __restrict dy, const float* __restrict g,
                       const float* __restrict u, float* __restrict dg, float* __restrict du,
                       int64_t n, Clamps c) {
  gated_mul_grad_loop<GeluErf>(dy, g, u, dg, du, n, c);
}

TRANSFUSE_MULTIVERSION
void gelu_tanh_mul_grad_row(const float* __restrict dy, const float* __restrict g,
                            const float* __restrict u, float* __restrict dg, float* __restrict du,
                            int64_t n, Clamps c) {
  gated_mul_grad_loop<GeluTanh>(dy, g, u, dg, du, n, c);
}

GatedMulRow gated_mul_row(GatedActivation activation) {
  switch (activation) {
    case GatedActivation::gelu: return gelu_mul_row;
    case GatedActivation::gelu_tanh: return gelu_tanh_mul_row;
    default: return silu_mul_row;
  }
}

GatedMulGradRow gated_mul_grad_row(GatedActivation activation) {
  switch (activation) {
    case GatedActivation::gelu: return gelu_mul_grad_row;
    case GatedActivation::gelu_tanh: return gelu_tanh_mul_grad_row;
    default: return silu_mul_grad_row;
  }
}

// z += bias, in place (16-bit inputs: the sum is then rounded to the dtype).
TRANSFUSE_MULTIVERSION
void add_bias_in_place(float* __restrict z, const float* __restrict bias, int64_t n) {
  for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
}

// ------------------------------------------------------------------------------------------------
// Work split
// ------------------------------------------------------------------------------------------------

// Columns of a tile: the fp32 scratch of a 16-bit tile (3 rows of it) stays in L1.
constexpr int64_t kTileCols = 2048;

// Where one tile lies: its first column, its width, and the index of its first element.
struct TileSpan {
  int64_t col, n, at;
};

struct Tiling {
  int64_t tiles_per_row = 0;
  int64_t tiles = 0;
  int threads = 1;

  TileSpan span(int64_t tile, int64_t cols) const {
    const int64_t row = tile / tiles_per_row;
    const int64_t col = (tile % tiles_per_row) * kTileCols;
    return {col, std::min(kTileCols, cols - col), row * cols + col};
  }
};

// Tiles of at most kTileCols columns of one row; threads (threads.h): one per tile and one per
// ~16K elements at most.
Tiling tiling_for(int num_threads, int64_t rows, int64_t cols) {
  Tiling t;
  if (rows <= 0 || cols <= 0) return t;
  t.tiles_per_row = (cols + kTileCols - 1) / kTileCols;
  t.tiles = rows * t.tiles_per_row;
  t.threads = threads_for(num_threads, t.tiles, rows * cols, 16384);
  return t;
}

// fp32 copy of the bias (16-bit dtypes); empty without bias.
std::vector<float> bias_as_float(const void* bias, DType dtype, int64_t cols) {
  std::vector<float> values;
  if (!bias) return values;
  values.resize(cols);
  load_row(bias, dtype, values.data(), cols);
  return values;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Forward and backward
// ------------------------------------------------------------------------------------------------

// y = round_x(gelu(round_x(x + bias)))
void gelu_row(const float* z, float* y, int64_t n, GeluApproximation approximate) {
  if (approximate == GeluApproximation::tanh) gelu_tanh_row(z, nullptr, y, n, kClamps);
  else gelu_erf_row(z, nullptr, y, n, kClamps);
}

void bias_gelu_forward(const BiasGeluForwardParams& p) {
  const Tiling tiling = tiling_for(p.num_threads, p.rows, p.cols);
  if (tiling.tiles == 0) return;
  const int64_t cols = p.cols;
  const bool use_tanh = p.approximate == GeluApproximation::tanh;
  auto gelu_row = use_tanh ? gelu_tanh_row : gelu_erf_row;

  if (p.dtype == DType::f32) {
    const float* x = static_cast<const float*>(p.x);
    const float* bias = static_cast<const float*>(p.bias);
    float* y = static_cast<float*>(p.y);
    in_team(tiling.threads, [&] {
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
        const auto [col, n, at] = tiling.span(tile, cols);
        gelu_row(x + at, bias ? bias + col : nullptr, y + at, n, kClamps);
      }
    });
    return;
  }

  const std::vector<float> bias = bias_as_float(p.bias, p.dtype, cols);
  in_team(tiling.threads, [&] {
    alignas(64) float z[kTileCols];
    alignas(64) float out[kTileCols];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
      const auto [col, n, at] = tiling.span(tile, cols);
      load_row(element_address(p.x, p.dtype, at), p.dtype, z, n);
      if (!bias.empty()) {
        add_bias_in_place(z, bias.data() + col, n);
        round_row(z, p.dtype, n);
      }
      gelu_row(z, nullptr, out, n, kClamps);
      store_row(out, p.dtype, element_address(p.y, p.dtype, at), n);
    }
  });
}

// dx = round_x(dy * gelu'(round_x(x + bias)))
void bias_gelu_backward(const BiasGeluBackwardParams& p) {
  const Tiling tiling = tiling_for(p.num_threads, p.rows, p.cols);
  if (tiling.tiles == 0) return;
  const int64_t cols = p.cols;
  const bool use_tanh = p.approximate == GeluApproximation::tanh;
  auto grad_row = use_tanh ? gelu_tanh_grad_row : gelu_erf_grad_row;

  if (p.dtype == DType::f32) {
    const float* dy = static_cast<const float*>(p.dy);
    const float* x = static_cast<const float*>(p.x);
    const float* bias = static_cast<const float*>(p.bias);
    float* dx = static_cast<float*>(p.dx);
    in_team(tiling.threads, [&] {
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
        const auto [col, n, at] = tiling.span(tile, cols);
        grad_row(dy + at, x + at, bias ? bias + col : nullptr, dx + at, n, kClamps);
      }
    });
    return;
  }

  const std::vector<float> bias = bias_as_float(p.bias, p.dtype, cols);
  in_team(tiling.threads, [&] {
    alignas(64) float z[kTileCols];
    alignas(64) float dy[kTileCols];
    alignas(64) float dz[kTileCols];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
      const auto [col, n, at] = tiling.span(tile, cols);
      load_row(element_address(p.x, p.dtype, at), p.dtype, z, n);
      if (!bias.empty()) {
        add_bias_in_place(z, bias.data() + col, n);
        round_row(z, p.dtype, n);
      }
      load_row(element_address(p.dy, p.dtype, at), p.dtype, dy, n);
      grad_row(dy, z, nullptr, dz, n, kClamps);
      store_row(dz, p.dtype, element_address(p.dx, p.dtype, at), n);
    }
  });
}

// y = round(act(gate) * up); tiles of one row, whose gate and up rows lie row_stride apart.
void gated_mul_forward(const GatedMulForwardParams& p) {
  const Tiling tiling = tiling_for(p.num_threads, p.rows, p.cols);
  if (tiling.tiles == 0) return;
  const GatedMulRow row_kernel = gated_mul_row(p.activation);
  in_team(tiling.threads, [&] {
    alignas(64) float g[kTileCols];
    alignas(64) float u[kTileCols];
    alignas(64) float y[kTileCols];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
      const auto [col, n, at] = tiling.span(tile, p.cols);
      const int64_t row = tile / tiling.tiles_per_row;
      const void* gate = element_address(p.gate, p.dtype, row * p.gate_row_stride + col);
      const void* up = element_address(p.up, p.dtype, row * p.up_row_stride + col);
      if (p.dtype == DType::f32) {
        row_kernel(static_cast<const float*>(gate), static_cast<const float*>(up),
                     static_cast<float*>(p.y) + at, n, kClamps);
        continue;
      }
      load_row(gate, p.dtype, g, n);
      load_row(up, p.dtype, u, n);
      row_kernel(g, u, y, n, kClamps);
      store_row(y, p.dtype, element_address(p.y, p.dtype, at), n);
    }
  });
}

// dgate = round(dy up act'(gate)), dup = round(dy act(gate))
void gated_mul_backward(const GatedMulBackwardParams& p) {
  const Tiling tiling = tiling_for(p.num_threads, p.rows, p.cols);
  if (tiling.tiles == 0) return;
  const GatedMulGradRow grad_kernel = gated_mul_grad_row(p.activation);
  in_team(tiling.threads, [&] {
    alignas(64) float dy[kTileCols];
    alignas(64) float g[kTileCols];
    alignas(64) float u[kTileCols];
    alignas(64) float dg[kTileCols];
    alignas(64) float du[kTileCols];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
      const auto [col, n, at] = tiling.span(tile, p.cols);
      const int64_t row = tile / tiling.tiles_per_row;
      const void* gate = element_address(p.gate, p.dtype, row * p.gate_row_stride + col);
      const void* up = element_address(p.up, p.dtype, row * p.up_row_stride + col);
      if (p.dtype == DType::f32) {
        grad_kernel(static_cast<const float*>(p.dy) + at, static_cast<const float*>(gate),
                          static_cast<const float*>(up), static_cast<float*>(p.dgate) + at,
                          static_cast<float*>(p.dup) + at, n, kClamps);
        continue;
      }
      load_row(element_address(p.dy, p.dtype, at), p.dtype, dy, n);
      load_row(gate, p.dtype, g, n);
      load_row(up, p.dtype, u, n);
      grad_kernel(dy, g, u, dg, du, n, kClamps);
      store_row(dg, p.dtype, element_address(p.dgate, p.dtype, at), n);
      store_row(du, p.dtype, element_address(p.dup, p.dtype, at), n);
    }
  });
}

}  // namespace transfuse::cpu
