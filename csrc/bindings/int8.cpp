// Binding of the int8 kernels: tensor checks, allocation, and the functions
// transfuse._C.quantize_per_token, int8_matmul, int8_linear_w8a8 and int8_linear_w8a16 (CPU or
// CUDA, from the tensors' device). On CPU the int8 x int8 product and its dequantizing epilogue
// are cpu/int8_vnni.cpp's where the CPU has AVX512-VNNI, cpu/int8_avx2.cpp's on AVX2 without
// AVX-512 or an int8 dot product; elsewhere the product is oneDNN's (at::_int_mm) where the CPU
// has an int8 dot product (AVX-VNNI), else (AVX-512 without VNNI, no AVX2, or a weight holding
// -128, which the AVX2 GEMM refuses) transfuse's int8 GEMV for a few rows and its fp32 GEMM with
// the epilogue beyond (w8a8_by_fp32_gemm). On CUDA the GEMM and its epilogue are one kernel.
// python/transfuse/ops/int8.py validates user input first; these checks guard the kernels.
#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include "dtype.h"
#include "packed_weights.h"
#include "python_functions.h"
#include "tensor_functions.h"

#include "../cpu/buffer.h"
#include "../cpu/gemm.h"
#include "../cpu/int8.h"

#ifdef TRANSFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/int8.h"
#endif

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_matrix(const Tensor& t, const char* name, at::ScalarType dtype, const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
}

void check_vector(const Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                  const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.size(0) == size, name,
                    " must be a contiguous vector of ", size, " elements");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
}

// The weight side of a linear call, and the output.
Int8LinearParams linear_params(const Tensor& w, const Tensor& w_scale, const OptTensor& bias,
                               at::ScalarType dtype, const Tensor& x, Tensor& out) {
  check_matrix(w, "w", at::kChar, x);
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "w must have x's k = ", x.size(1), " columns");
  check_vector(w_scale, "w_scale", at::kFloat, w.size(0), x);
  if (bias) check_vector(*bias, "bias", dtype, w.size(0), x);
  Int8LinearParams p;
  p.w = w.data_ptr<int8_t>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.m = x.size(0);
  p.n = w.size(0);
  p.k = x.size(1);
  p.dtype = to_dtype(dtype, "the output dtype");
  out = at::empty({p.m, p.n}, x.options().dtype(dtype));
  p.out = out.data_ptr();
  p.num_threads = at::get_num_threads();
  return p;
}

// a [m, k] @ b [n, k]^T in int32 through fp32 GEMMs over chunks of at most kExactChunk columns
// of k: every partial sum of a chunk is an integer of magnitude <= 1024 * 128 * 128 = 2^24, which
// fp32 holds exactly, whatever order the GEMM adds in; the chunks' sums are added in int32.
// Exact, at fp32 GEMM speed (for CPUs whose int8 GEMM is slow).
Tensor int_mm_by_fp32(const Tensor& a, const Tensor& b) {
  constexpr int64_t kExactChunk = 1024;
  const Tensor af = a.to(at::kFloat), bf = b.to(at::kFloat);
  const int64_t k = a.size(1);
  Tensor acc;
  for (int64_t k0 = 0; k0 < k; k0 += kExactChunk) {
    const int64_t len = std::min(kExactChunk, k - k0);
    Tensor part = at::mm(af.narrow(1, k0, len), bf.narrow(1, k0, len).t()).to(at::kInt);
    acc = acc.defined() ? acc.add_(part) : part;
  }
  return acc;
}

// a [m, k] @ b [n, k]^T in int32 on a CPU without AVX512-VNNI: oneDNN's (torch._int_mm) where the
// CPU has an int8 dot product (AVX-VNNI), else cpu::int8_gemv up to cpu::kInt8GemvMaxRows rows
// (decoding: the weights read once, as int8; int_mm_by_fp32 converted them to fp32 per call) and
// int_mm_by_fp32 beyond (without VNNI torch._int_mm measured 4 GFLOP/s on an AVX2-only AMD EPYC
// with torch 2.13, 0.04x fp32 F.linear). For k = 1, where torch._int_mm on CPU returns wrong
// sums (torch 2.13; found by the int8 fuzz test), an int32 outer product, exact and cheap.
Tensor int_mm(const Tensor& a, const Tensor& b) {
  if (a.size(0) <= cpu::kInt8GemvMaxRows && !cpu::has_int8_dot()) {  // no VNNI: the GEMV
    Tensor acc = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
    Int8LinearParams p;
    p.x_q = a.data_ptr<int8_t>();
    p.w = b.data_ptr<int8_t>();
    p.acc = acc.data_ptr<int32_t>();
    p.m = a.size(0);
    p.n = b.size(0);
    p.k = a.size(1);
    p.num_threads = at::get_num_threads();
    if (cpu::int8_gemv(p)) return acc;
  }
  if (a.size(1) == 1) return at::mm(a.to(at::kInt), b.to(at::kInt).t());
  if (!cpu::has_int8_dot() && a.size(0) >= 4) return int_mm_by_fp32(a, b);
  return at::_int_mm(a, b.t());
}

#ifdef TRANSFUSE_WITH_CUDA
void launch_linear_cuda(const Int8LinearParams& p, const Tensor& x) {
  const char* unsupported = cuda::int8_linear_unsupported(p);
  TORCH_CHECK_VALUE(unsupported[0] == '\0', "the CUDA int8 kernel cannot run this call: ",
                    unsupported);
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::int8_linear_launch(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

std::tuple<Tensor, Tensor> quantize_per_token(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  QuantizeParams p;
  p.dtype = to_dtype(x.scalar_type(), "x");
  p.rows = x.size(0);
  p.cols = x.size(1);
  Tensor q = at::empty({p.rows, p.cols}, x.options().dtype(at::kChar));
  Tensor scale = at::empty({p.rows}, x.options().dtype(at::kFloat));
  p.x = x.data_ptr();
  p.q = q.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  if (p.rows == 0 || p.cols == 0) return {q, scale.fill_(1.f)};
  if (x.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::quantize_per_token_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::quantize_per_token(p);
  }
  return {q, scale};
}

Tensor int8_matmul(const Tensor& a, const Tensor& b) {
  check_matrix(a, "a", at::kChar, a);
  check_matrix(b, "b", at::kChar, a);
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "a and b must have the same k");
  Tensor acc = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  Int8LinearParams p;
  p.x_q = a.data_ptr<int8_t>();
  p.w = b.data_ptr<int8_t>();
  p.acc = acc.data_ptr<int32_t>();
  p.m = a.size(0);
  p.n = b.size(0);
  p.k = a.size(1);
  p.num_threads = at::get_num_threads();
  if (!a.is_cuda())
    return p.m * p.n * p.k > 0 && (cpu::int8_linear_vnni(p) || cpu::int8_linear_avx2(p))
               ? acc
               : int_mm(a, b);
#ifdef TRANSFUSE_WITH_CUDA
  launch_linear_cuda(p, a);
#endif
  return acc;
}

Tensor int8_linear_w8a8(const Tensor& x_q, const Tensor& x_scale, const Tensor& w,
                        const Tensor& w_scale, const OptTensor& bias, at::ScalarType dtype) {
  check_matrix(x_q, "x_q", at::kChar, x_q);
  check_vector(x_scale, "x_scale", at::kFloat, x_q.size(0), x_q);
  Tensor out;
  Int8LinearParams p = linear_params(w, w_scale, bias, dtype, x_q, out);
  p.x_scale = x_scale.data_ptr<float>();
  p.x_q = x_q.data_ptr<int8_t>();
  if (x_q.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    launch_linear_cuda(p, x_q);
#endif
  } else if (p.m * p.n * p.k == 0 || !cpu::int8_linear_vnni(p)) {
    Tensor acc = int_mm(x_q, w);
    p.acc = acc.data_ptr<int32_t>();
    cpu::dequantize_accumulators(p);
  }
  return out;
}

Tensor int8_linear_w8a16(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                         const OptTensor& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  Tensor out;
  Int8LinearParams p = linear_params(w, w_scale, bias, x.scalar_type(), x, out);
  p.x = x.data_ptr();
  if (x.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    launch_linear_cuda(p, x);
#endif
  } else {
    cpu::int8_linear_w8a16(p);
  }
  return out;
}

constexpr int64_t kGemvMaxRows = 16;  // w8a16 rows up to this go to the GEMV kernels (decoding)
// but on a CPU with AVX-512, where up to kCpuGemvMaxRows do, and more go to cpu::gemm (4096 x
// 4096, 2 threads: 32 rows 5.9 ms against the GEMM's 7.2, 48 rows 7.7 against 9.3, 64 level;
// both near the fp32 FMA peak from 16 rows)
constexpr int64_t kCpuGemvMaxRows = 48;
// and for bf16 x on a CPU with AVX512_BF16, up to kBf16GemvMaxRows (all-mpnet-base-v2's
// shapes, 2 threads, AMD EPYC: at 8 rows GEMV and bf16 GEMM level, at 12 the GEMM 1.0-1.5x
// faster, at 23 1.5-1.8x); and on a CPU with AVX2 but not AVX-512 one row (its w8a16 GEMV, not
// written with intrinsics, ran 0.3-0.9x fp32 F.linear at 2-16 rows on an AMD EPYC, 2 threads),
// more rows cpu::gemm
constexpr int64_t kBf16GemvMaxRows = 8;
constexpr int64_t kMaxK = 133000;  // k * 127 * 127 below 2^31: exact int32 sums (= Python MAX_K)
constexpr int64_t kDequantBlockElements = 1 << 23;  // CPU w8a16 beyond the GEMV: weights
                                                   // dequantized at once (32 MB of fp32)

// CPU w8a16 for more rows than the GEMV takes, without AVX-512: x @ (w * w_scale[:, None])^T +
// bias, one fp32 GEMM (addmm) per block of weight rows dequantized with their scales (one block
// unless the weight has more than kDequantBlockElements), in x's dtype. The scale folded into the
// weight rounds each w * s once in fp32: within the fp32 accumulation's error of (x @ w^T) * s.
Tensor w8a16_by_blocks(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                       const OptTensor& bias) {
  const int64_t n = w.size(0), k = w.size(1);
  const Tensor xf = x.to(at::kFloat);
  const OptTensor bias_f = bias ? OptTensor(bias->to(at::kFloat)) : std::nullopt;
  const int64_t block_rows = std::max<int64_t>(1, std::min(n, kDequantBlockElements / k));
  Tensor weights = at::empty({block_rows, k}, xf.options());
  Tensor out = at::empty({x.size(0), n}, xf.options());
  for (int64_t n0 = 0; n0 < n; n0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - n0);
    cpu::dequantize_weight(w.data_ptr<int8_t>() + n0 * k, w_scale.data_ptr<float>() + n0, rows, k,
                           weights.data_ptr<float>(), at::get_num_threads());
    const Tensor wt = weights.narrow(0, 0, rows).t();
    if (rows == n) {
      if (bias_f) at::addmm_out(out, *bias_f, xf, wt);
      else at::mm_out(out, xf, wt);
    } else {
      Tensor part = bias_f ? at::addmm(bias_f->narrow(0, n0, rows), xf, wt) : at::mm(xf, wt);
      out.narrow(1, n0, rows).copy_(part);
    }
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

constexpr int kInt8PairsLayout = 1;  // an int8 weight's packing for the bf16 GEMM (the VNNI
                                     // GEMM's is layout 0)
constexpr int kInt8StripsLayout = 2;  // and for the fp32 GEMM on AVX2
constexpr int kInt8Avx2Layout = 3;    // and for the int8 GEMM on AVX2

// w's int8 strips for the fp32 GEMM on AVX2, kept between calls; nothing elsewhere (or not kept).
OptTensor int8_strips(const Tensor& w) {
  const int64_t bytes = cpu::packed_weight_bytes_int8_strips(w.size(0), w.size(1));
  if (bytes == 0 || !w.is_contiguous()) return std::nullopt;
  return packed_weights().of(
      w, bytes,
      [](const Tensor& w, Tensor& out) {
        return cpu::pack_weight_int8_strips(w.data_ptr<int8_t>(), w.size(0), w.size(1),
                                            out.data_ptr(), at::get_num_threads());
      },
      kInt8StripsLayout);
}

// Whether CPU w8a16 of x takes the bf16 GEMM: bf16 x on a CPU with AVX512_BF16.
bool w8a16_bf16_gemm(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && cpu::has_gemm_bf16();
}

// CPU w8a16 for more rows than the GEMV takes: cpu::gemm_bf16 for bf16 x where it runs, else
// cpu::gemm on x in fp32 (AVX-512 or AVX2), each widening the int8 weights as it packs them or
// (AVX2, int8_strips) as its tiles load them, else w8a16_by_blocks.
Tensor w8a16_cpu(const Tensor& x, const Tensor& w, const Tensor& w_scale, const OptTensor& bias) {
  Tensor out;
  const Int8LinearParams p = linear_params(w, w_scale, bias, x.scalar_type(), x, out);
  const bool bf16 = w8a16_bf16_gemm(x);
  const Tensor xf = bf16 ? x : x.to(at::kFloat);
  const OptTensor bias_f = bias ? OptTensor(bias->to(at::kFloat)) : std::nullopt;
  GemmParams g;
  g.x = xf.data_ptr();
  g.w = p.w;
  g.w_int8 = true;
  g.w_scale = p.w_scale;
  g.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  g.out = p.out;
  g.m = p.m;
  g.n = p.n;
  g.k = p.k;
  g.dtype = p.dtype;
  g.num_threads = p.num_threads;
  OptTensor packed = bf16 ? std::nullopt : int8_strips(w);
  if (bf16 && w.is_contiguous()) {
    packed = packed_weights().of(
        w, cpu::packed_weight_bytes_int8_pairs(p.n, p.k),
        [](const Tensor& w, Tensor& out) {
          return cpu::pack_weight_int8_pairs(w.data_ptr<int8_t>(), w.size(0), w.size(1),
                                             out.data_ptr(), at::get_num_threads());
        },
        kInt8PairsLayout);
  }
  if (packed) g.w_packed = packed->data_ptr();
  return (bf16 ? cpu::gemm_bf16(g) : cpu::gemm(g)) ? out : w8a16_by_blocks(x, w, w_scale, bias);
}

// From 4 rows the GEMM on kept int8 strips ran 1.0-1.7x the int8 GEMV (48 cold weights, MiniLM's
// shapes, 4-15 rows; level at 2, slower at 1); the GEMV keeps the rows of decoding.
constexpr int64_t kW8a8GemmMinRows = 4;

// w8a8 on a CPU without an int8 dot product where cpu::int8_linear_avx2 does not run (AVX-512
// without VNNI; a weight holding -128), from a few rows: cpu::gemm on the quantized rows as fp32,
// the int8 weights widened as its tiles load them (int8_strips) or as it packs them, the x and w
// scales and the bias in its epilogue. The integer products are exact in fp32; their sums are while
// every partial sum stays below 2^24 (k * 127 * 127 < 2^24: k <= 1040), and beyond that are rounded
// as fp32 sums (relatively by at most k * 2^-24, far below the quantization's error). Against the
// exact int32 product through fp32 GEMMs over chunks of k (int_mm, which converts the weights to
// fp32 per call, then dequantizes in a second pass): 1.5-2.5x faster on all-MiniLM-L6-v2's shapes
// at 16-96 rows on an AVX2-only AMD EPYC, level with the fp32 linear. False where the CPU has an
// int8 dot product or no GEMM, or for fewer than kW8a8GemmMinRows rows.
bool w8a8_by_fp32_gemm(const std::vector<Int8LinearParams>& ps, const std::vector<Tensor>& ws,
                       const std::vector<OptTensor>& biases) {
  const int64_t m = ps[0].m, k = ps[0].k;
  if (cpu::has_int8_dot() || cpu::gemm_max_rows() == 0 || m < kW8a8GemmMinRows) return false;
  const auto x = cpu::uninitialized<float>(m * k);  // exact
  for (int64_t e = 0; e < m * k; ++e) x[e] = float(ps[0].x_q[e]);
  for (size_t i = 0; i < ps.size(); ++i) {
    const Int8LinearParams& p = ps[i];
    const OptTensor bias = biases[i] ? OptTensor(biases[i]->to(at::kFloat)) : std::nullopt;
    const OptTensor packed = int8_strips(ws[i]);
    GemmParams g;
    g.x = x.get();
    g.w = p.w;
    g.w_int8 = true;
    g.w_packed = packed ? packed->data_ptr() : nullptr;
    g.x_scale = p.x_scale;
    g.w_scale = p.w_scale;
    g.bias = bias ? bias->data_ptr<float>() : nullptr;
    g.out = p.out;
    g.m = m;
    g.n = p.n;
    g.k = k;
    g.dtype = p.dtype;
    g.num_threads = p.num_threads;
    TORCH_CHECK(cpu::gemm(g), "cpu::gemm declined the call");  // (gemm_max_rows() > 0)
  }
  return true;
}

// w8a8 of x [m, k] by each weight on the CPU, x's quantized rows in buffers of the call (tensors
// cost their allocation: a third of a one-token call), shared by the products (one team for their
// panels where the CPU has AVX512-VNNI).
std::vector<Tensor> w8a8_cpu(const Tensor& x, const std::vector<Tensor>& ws,
                             const std::vector<Tensor>& w_scales,
                             const std::vector<OptTensor>& biases) {
  const int64_t m = x.size(0), k = x.size(1);
  const auto x_q = cpu::uninitialized<int8_t>(m * k);
  const auto x_scale = cpu::uninitialized<float>(m);
  QuantizeParams q;
  q.x = x.data_ptr();
  q.q = x_q.get();
  q.scale = x_scale.get();
  q.rows = m;
  q.cols = k;
  q.dtype = to_dtype(x.scalar_type(), "x");
  q.num_threads = at::get_num_threads();
  cpu::quantize_per_token(q);
  std::vector<Tensor> outs(ws.size());
  std::vector<OptTensor> packs(ws.size());  // alive until the products are done
  std::vector<Int8LinearParams> ps;
  for (size_t i = 0; i < ws.size(); ++i) {
    Int8LinearParams p = linear_params(ws[i], w_scales[i], biases[i], x.scalar_type(), x, outs[i]);
    p.x_q = x_q.get();
    p.x_scale = x_scale.get();
    if (cpu::int8_vnni_packs(m, k))
      packs[i] = packed_weights().of(ws[i], cpu::packed_weight_bytes(p.n, k),
                                     [](const Tensor& w, Tensor& out) {
                                       return cpu::pack_weight_vnni(
                                           w.data_ptr<int8_t>(), w.size(0), w.size(1),
                                           out.data_ptr<int8_t>(), at::get_num_threads());
                                     });
    else if (const int64_t bytes = cpu::packed_weight_bytes_int8_avx2(p.n, k))
      packs[i] = packed_weights().of(
          ws[i], bytes,
          [](const Tensor& w, Tensor& out) {
            return cpu::pack_weight_int8_avx2(w.data_ptr<int8_t>(), w.size(0), w.size(1),
                                              out.data_ptr<int8_t>(), at::get_num_threads());
          },
          kInt8Avx2Layout);
    if (packs[i]) p.w_packed = packs[i]->data_ptr<int8_t>();
    ps.push_back(p);
  }
  if (cpu::int8_linears_vnni(ps.data(), int64_t(ps.size()))) return outs;
  // AVX2 without an int8 dot product: each product on cpu::int8_linear_avx2, unless a weight
  // holds -128 (then all go on below, the outputs written before written again)
  if (std::all_of(ps.begin(), ps.end(), cpu::int8_linear_avx2)) return outs;
  if (w8a8_by_fp32_gemm(ps, ws, biases)) return outs;
  const Tensor x_q_tensor = at::from_blob(x_q.get(), {m, k}, x.options().dtype(at::kChar));
  for (size_t i = 0; i < ws.size(); ++i) {
    Tensor acc = int_mm(x_q_tensor, ws[i]);
    ps[i].acc = acc.data_ptr<int32_t>();
    cpu::dequantize_accumulators(ps[i]);
  }
  return outs;
}

}  // namespace

// One eager int8 linear call on the CPU or CUDA backend: x [..., k] (any layout) @ (w *
// w_scale[:, None])^T + bias (cast to x's dtype) -> [..., n] in x's dtype; w8a8 quantizes x per
// token first. Checks every argument. Returns nothing for what it leaves to the Python op: an
// empty product (the reference's zeros + bias) and, on CUDA, w8a16 beyond kGemvMaxRows rows
// (Triton).
std::optional<Tensor> int8_linear(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                                  const OptTensor& bias, c10::string_view mode) {
  return int8_linears(x, {w}, {w_scale}, {bias}, mode)[0];
}

// int8_linear of one x by each weight (Q, K and V): in w8a8 x quantized once for all of them,
// on the CPU their products in one team.
std::vector<OptTensor> int8_linears(const Tensor& x, const std::vector<Tensor>& ws,
                                    const std::vector<Tensor>& w_scales,
                                    const std::vector<OptTensor>& biases,
                                    c10::string_view mode) {
  const bool w8a8 = mode == "w8a8";
  TORCH_CHECK_VALUE(w8a8 || mode == "w8a16", "mode must be one of ('w8a8', 'w8a16'), got '",
                    mode, "'");
  TORCH_CHECK_VALUE(ws.size() == w_scales.size() && ws.size() == biases.size(),
                    "each weight needs its scales and bias (or None)");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  to_dtype(x.scalar_type(), "x");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  std::vector<OptTensor> outs(ws.size());
  std::vector<size_t> taken;  // the calls with a product to compute here
  std::vector<Tensor> w_cs, w_scale_cs;
  std::vector<OptTensor> bias_xs;
  for (size_t i = 0; i < ws.size(); ++i) {
    const Tensor& w = ws[i];
    TORCH_CHECK_TYPE(w.dim() == 2 && w.scalar_type() == at::kChar,
                     "w_int8 must be a 2-D int8 tensor [out_features, in_features]");
    TORCH_CHECK_VALUE(w.size(1) == k, "x's last dimension (", k,
                      ") must equal w_int8's in_features (", w.size(1), ")");
    TORCH_CHECK_VALUE(k <= kMaxK, "in_features ", k, " exceeds ", kMaxK,
                      ": the int32 accumulator could overflow");
    TORCH_CHECK_VALUE(w.device() == x.device(), "w_int8 is on ", w.device(), " but x is on ",
                      x.device());
    if (m == 0 || k == 0 || w.size(0) == 0) continue;
    if (!w8a8 && x.is_cuda() && m > kGemvMaxRows) continue;
    const OptTensor& bias = biases[i];
    TORCH_CHECK_TYPE(!bias || at::isFloatingType(bias->scalar_type()),
                     "bias must be a float tensor or None");
    taken.push_back(i);
    w_cs.push_back(w.contiguous());
    w_scale_cs.push_back(w_scales[i].contiguous());
    // the bias's shape and device: checked below
    bias_xs.push_back(bias ? OptTensor(bias->to(x.scalar_type())) : std::nullopt);
  }
  if (taken.empty()) return outs;
  const Tensor x2 = x.reshape({m, k}).contiguous();
  std::vector<Tensor> results;
  if (w8a8 && !x.is_cuda()) {
    results = w8a8_cpu(x2, w_cs, w_scale_cs, bias_xs);
  } else if (w8a8) {
    const auto [x_q, x_scale] = quantize_per_token(x2);
    for (size_t j = 0; j < taken.size(); ++j)
      results.push_back(
          int8_linear_w8a8(x_q, x_scale, w_cs[j], w_scale_cs[j], bias_xs[j], x.scalar_type()));
  } else {
    const bool cpu_gemm = !x.is_cuda() && (w8a16_bf16_gemm(x)         ? m > kBf16GemvMaxRows
                                           : cpu::has_gemm()           ? m > kCpuGemvMaxRows
                                           : cpu::gemm_max_rows() > 0 ? m > 1
                                                                       : m > kGemvMaxRows);
    for (size_t j = 0; j < taken.size(); ++j)
      results.push_back(cpu_gemm ? w8a16_cpu(x2, w_cs[j], w_scale_cs[j], bias_xs[j])
                                 : int8_linear_w8a16(x2, w_cs[j], w_scale_cs[j], bias_xs[j]));
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  for (size_t j = 0; j < taken.size(); ++j) {
    out_shape.back() = w_cs[j].size(0);
    outs[taken[j]] = results[j].view(out_shape);
  }
  return outs;
}

// The kernels as functions of transfuse._C (python_functions.h).
void add_int8_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  const py::call_guard<py::gil_scoped_release> release_gil;
  m.def("int8_linear", &int8_linear, "x"_a, "w"_a, "w_scale"_a, "bias"_a, "mode"_a, release_gil);
  m.def("quantize_per_token", &quantize_per_token, "x"_a, release_gil);
  m.def("int8_matmul", &int8_matmul, "a"_a, "b"_a, release_gil);
  m.def("int8_linear_w8a8", &int8_linear_w8a8, "x_q"_a, "x_scale"_a, "w"_a, "w_scale"_a, "bias"_a,
        "dtype"_a, release_gil);
  m.def("int8_linear_w8a16", &int8_linear_w8a16, "x"_a, "w"_a, "w_scale"_a, "bias"_a, release_gil);
}

}  // namespace transfuse
