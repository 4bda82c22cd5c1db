// Torch-free test of the CUDA attention forward (cuda/attention.cu) against a double-precision
// reference written out here (the math of common/attention.h): fp16 and bf16, head_dim 8 to 256
// (every bucket, with and without a tail), seq 1 / 17 / 129 / 1000, GQA, bottom-right causal with
// seq_q < seq_kv and seq_q > seq_kv, sliding window, softcap, bool and additive (f32 / f16 /
// bf16) masks broadcast by strides (a key stride other than 1 too), rows and whole batches that
// see no key, seq_kv = 0, seq_q = 0, decoding shapes that take the split-KV path (and ones that
// must not), [B, S, H, D] and padded layouts, misaligned pointers (the scalar load / store paths),
// lse = null; and the packed ("varlen") layout: sequences of lengths 0 to 4096 in one call, each
// checked against the reference and against the padded call of that sequence alone (see
// run_varlen_case), prefill and decoding, causal, window, softcap, masks, GQA, split-KV.
// Every output buffer (and the split-KV workspace) is filled with NaN (0xFF bytes) before the
// kernels run, so an element they forget to write fails, and so does one written outside the
// output's strided elements; the gaps of strided inputs hold NaN too, so reading one fails.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_80,code=sm_80
//        -gencode arch=compute_90a,code=sm_90a -I csrc csrc/tests/test_attention_cuda.cu
//        csrc/cuda/attention.cu -o test_attention_cuda          (one command line)
//
// Prints one line a case and "N passed, 0 failed"; returns 0 on success, 1 on a failure, 77
// without a CUDA device (of compute capability 8.0 or more).
//
// Tolerances. out: |err| <= 2e-2 * max |ref| over the case (inputs are exact in their dtype; the
// kernel rounds P to the input dtype for P V and the output to the output dtype). lse (fp32,
// natural log): |err| <= 1e-3 * (1 + |ref|); +inf exactly where a row sees no key.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "tests/cuda_test_util.cuh"

using transfuse::AttentionParams;
using transfuse::DType;
using transfuse::MaskKind;

namespace {

using namespace transfuse::test;

constexpr double kOutTolerance = 2e-2;
constexpr double kLseTolerance = 1e-3;

// Device memory: `bytes` bytes, starting 256-byte aligned.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    check_cuda(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16)), "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  void upload(const void* host, size_t bytes) {
    check_cuda(cudaMemcpy(ptr_, host, std::min(bytes, bytes_), cudaMemcpyHostToDevice), "upload");
  }
  template <typename E>
  std::vector<E> download() const {
    std::vector<E> host(bytes_ / sizeof(E));
    check_cuda(cudaMemcpy(host.data(), ptr_, host.size() * sizeof(E), cudaMemcpyDeviceToHost), "download");
    return host;
  }
  void poison() { check_cuda(cudaMemset(ptr_, 0xFF, std::max<size_t>(bytes_, 16)), "poison"); }  // NaN

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// How q, k, v and out are laid out in memory ([B, H, S, D] logically).
enum class Layout {
  bhsd,    // contiguous [B, H, S, D]
  bshd,    // contiguous [B, S, H, D] (transformers' layout; the binding's out)
  padded,  // [B, H, S, D + 4]: rows 8 bytes apart from 16-byte alignment, gaps between rows
};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::bshd: return "bshd";
    case Layout::padded: return "padded";
    default: return "bhsd";
  }
}

// A [b, h, s, d] tensor of 16-bit elements at element strides, `offset` elements into a buffer
// of `storage` elements.
struct Strided {
  int64_t sizes[4] = {0, 0, 0, 0};
  int64_t strides[3] = {0, 0, 0};
  int64_t offset = 0;
  int64_t storage = 0;

  Strided(Layout layout, int64_t b, int64_t h, int64_t s, int64_t d, bool misaligned) {
    sizes[0] = b;
    sizes[1] = h;
    sizes[2] = s;
    sizes[3] = d;
    if (layout == Layout::bshd) {
      strides[0] = s * h * d;
      strides[1] = d;
      strides[2] = h * d;
    } else {
      const int64_t row = layout == Layout::padded ? d + 4 : d;
      strides[0] = h * s * row;
      strides[1] = s * row;
      strides[2] = row;
    }
    offset = misaligned ? 1 : 0;
    storage = offset + 8;
    if (b > 0 && h > 0 && s > 0 && d > 0) {
      storage = offset + (b - 1) * strides[0] + (h - 1) * strides[1] + (s - 1) * strides[2] + d + 8;
    }
  }
  int64_t count() const { return sizes[0] * sizes[1] * sizes[2] * sizes[3]; }
  int64_t at(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return offset + b * strides[0] + h * strides[1] + s * strides[2] + d;
  }
  // Logical values [b][h][s][d] -> storage bits, NaN in every gap.
  std::vector<uint16_t> encode(const std::vector<float>& values, DType t) const {
    std::vector<uint16_t> bits(static_cast<size_t>(storage), 0xFFFFu);
    int64_t n = 0;
    for (int64_t b = 0; b < sizes[0]; ++b)
      for (int64_t h = 0; h < sizes[1]; ++h)
        for (int64_t s = 0; s < sizes[2]; ++s)
          for (int64_t d = 0; d < sizes[3]; ++d) bits[at(b, h, s, d)] = to_bits(values[n++], t);
    return bits;
  }
};

struct Case {
  const char* name = "";
  DType dtype = DType::f16;
  int64_t batch = 1;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;
  int64_t seq_q = 1;
  int64_t seq_kv = 1;
  int64_t head_dim = 64;
  bool causal = false;
  int64_t window = 0;
  float softcap = 0.f;
  float scale = 0.f;  // 0: head_dim^-0.5
  MaskKind mask = MaskKind::none;
  DType mask_dtype = DType::f32;
  bool mask_heads = true;        // false: the mask broadcasts over heads (stride 0)
  bool mask_rows = true;         // false: ... and over query rows (a padding mask)
  bool mask_transposed = false;  // stored [.., seq_kv, seq_q]: the key stride is not 1
  Layout layout = Layout::bhsd;
  bool misaligned = false;  // every tensor starts one element past a 16-byte boundary
  bool lse = true;
  bool expect_split = false;   // a decoding shape that must take the split-KV path
  bool expect_single = false;  // ... that must not split (the CTAs fill the GPU)

  std::string describe() const {
    char text[400];
    std::snprintf(text, sizeof(text),
                  "%s: %s B=%lld Hq=%lld Hkv=%lld Sq=%lld Skv=%lld D=%lld%s window=%lld softcap=%g "
                  "mask=%s%s%s%s%s layout=%s%s%s",
                  name, dtype_name(dtype), static_cast<long long>(batch), static_cast<long long>(heads_q),
                  static_cast<long long>(heads_kv), static_cast<long long>(seq_q),
                  static_cast<long long>(seq_kv), static_cast<long long>(head_dim), causal ? " causal" : "",
                  static_cast<long long>(window), softcap,
                  mask == MaskKind::none ? "none" : mask == MaskKind::boolean ? "bool" : "additive-",
                  mask == MaskKind::additive ? dtype_name(mask_dtype) : "",
                  mask != MaskKind::none && !mask_heads ? " (all heads)" : "",
                  mask != MaskKind::none && !mask_rows ? " (all rows)" : "",
                  mask != MaskKind::none && mask_transposed ? " (key stride != 1)" : "", layout_name(layout),
                  misaligned ? " misaligned" : "", lse ? "" : " lse=null");
    return text;
  }
};

// The mask as stored: [batch, mh, mq, seq_kv] (or [.., seq_kv, mq] when transposed), mh and mq
// 1 where it broadcasts, read through 4 strides.
struct HostMask {
  int64_t strides[4] = {0, 0, 0, 0};
  std::vector<double> values;      // what the reference reads (bool: 0 / 1)
  std::vector<uint8_t> bytes;      // what the kernel reads
  double at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return values[static_cast<size_t>(b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3])];
  }
};

HostMask make_mask(const Case& c, Rng& rng) {
  HostMask m;
  const int64_t mh = c.mask_heads ? c.heads_q : 1;
  const int64_t mq = c.mask_rows ? c.seq_q : 1;
  const int64_t mk = c.seq_kv;
  const int64_t n = c.batch * mh * mq * mk;
  if (c.mask_transposed) {
    m.strides[0] = mh * mk * mq;
    m.strides[1] = mh > 1 ? mk * mq : 0;
    m.strides[2] = mq > 1 ? 1 : 0;
    m.strides[3] = mq;
  } else {
    m.strides[0] = mh * mq * mk;
    m.strides[1] = mh > 1 ? mq * mk : 0;
    m.strides[2] = mq > 1 ? mk : 0;
    m.strides[3] = 1;
  }
  m.values.assign(static_cast<size_t>(std::max<int64_t>(n, 1)), 0.0);
  const double ninf = -std::numeric_limits<double>::infinity();
  // Element (b, h, i, j) of the stored shape.
  auto index = [&](int64_t b, int64_t h, int64_t i, int64_t j) {
    return static_cast<size_t>(b * m.strides[0] + h * (mh > 1 ? m.strides[1] : 0) +
                               i * (mq > 1 ? m.strides[2] : 0) + j * m.strides[3]);
  };
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < mh; ++h)
      for (int64_t i = 0; i < mq; ++i)
        for (int64_t j = 0; j < mk; ++j) {
          double v;
          if (c.mask == MaskKind::boolean) {
            v = rng.uniform(0.f, 1.f) < 0.8f ? 1.0 : 0.0;
            if (c.batch > 1 && b == c.batch - 1) v = 0.0;  // a whole sequence sees nothing
          } else {
            const float r = rng.uniform(0.f, 1.f);
            if (r < 0.1f) {
              v = ninf;
            } else if (r < 0.15f && c.mask_dtype == DType::f16) {
              v = -65504.0;  // finfo(f16).min, as transformers writes
            } else {
              v = round_to(rng.uniform(-3.f, 3.f), c.mask_dtype);
            }
          }
          // One row that sees no key (its stored row: every row of it when mq == 1).
          if (b == 0 && h == 0 && i == std::min<int64_t>(3, mq - 1) && mq > 1) {
            v = c.mask == MaskKind::boolean ? 0.0 : ninf;
          }
          m.values[index(b, h, i, j)] = v;
        }
  const size_t count = m.values.size();
  if (c.mask == MaskKind::boolean) {
    m.bytes.resize(count);
    for (size_t e = 0; e < count; ++e) m.bytes[e] = m.values[e] != 0.0 ? 1 : 0;
  } else if (c.mask_dtype == DType::f32) {
    m.bytes.resize(count * 4);
    for (size_t e = 0; e < count; ++e) {
      const float f = static_cast<float>(m.values[e]);
      std::memcpy(&m.bytes[4 * e], &f, 4);
    }
  } else {
    m.bytes.resize(count * 2);
    for (size_t e = 0; e < count; ++e) {
      const uint16_t bits = to_bits(static_cast<float>(m.values[e]), c.mask_dtype);
      std::memcpy(&m.bytes[2 * e], &bits, 2);
    }
  }
  return m;
}

std::vector<float> random_values(Rng& rng, int64_t n, float lo, float hi, DType t) {
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& v : values) v = round_to(rng.uniform(lo, hi), t);
  return values;
}

// The double-precision reference: q [B, Hq, Sq, D], k / v [B, Hkv, Skv, D] contiguous; the mask
// read at mask.at(mask_b0 + b, h, i, j) (mask_b0: the sequence's batch index when c is one
// sequence of a packed call). Rows that see no key: zeros and lse = +inf.
struct Reference {
  std::vector<double> out;  // [B, Hq, Sq, D]
  std::vector<double> lse;  // [B, Hq, Sq]
  double max_abs = 0.0;     // max |out|
};

Reference reference_attention(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                              const std::vector<float>& v, const HostMask& mask, int64_t mask_b0) {
  const int64_t B = c.batch, Hq = c.heads_q, Hkv = c.heads_kv, Sq = c.seq_q, Skv = c.seq_kv, D = c.head_dim;
  const int64_t group = Hq / Hkv;
  const double scale = c.scale != 0.f ? c.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const double inf = std::numeric_limits<double>::infinity();
  Reference r;
  r.out.assign(static_cast<size_t>(B * Hq * Sq * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * Hq * Sq), inf);
  std::vector<double> s(static_cast<size_t>(std::max<int64_t>(Skv, 1)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < Sq; ++i) {
        const float* qi = &q[static_cast<size_t>(((b * Hq + h) * Sq + i) * D)];
        const int64_t diag = i + Skv - Sq;
        double mx = -inf;
        for (int64_t j = 0; j < Skv; ++j) {
          bool visible = true;
          if (c.causal && j > diag) visible = false;
          if (c.window > 0 && std::llabs(diag - j) >= c.window) visible = false;
          double bias = 0.0;
          if (visible && c.mask == MaskKind::boolean) visible = mask.at(mask_b0 + b, h, i, j) != 0.0;
          if (visible && c.mask == MaskKind::additive) bias = mask.at(mask_b0 + b, h, i, j);
          double x = -inf;
          if (visible) {
            const float* kj = &k[static_cast<size_t>(((b * Hkv + hk) * Skv + j) * D)];
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * kj[d];
            x = scale * dot;
            if (c.softcap > 0.f) x = c.softcap * std::tanh(x / c.softcap);
            x += bias;
          }
          s[static_cast<size_t>(j)] = x;
          mx = std::max(mx, x);
        }
        if (mx == -inf) continue;  // no visible key: zeros, lse = +inf
        double total = 0.0;
        double* out_row = &r.out[static_cast<size_t>(((b * Hq + h) * Sq + i) * D)];
        for (int64_t j = 0; j < Skv; ++j) {
          const double w = std::exp(s[static_cast<size_t>(j)] - mx);
          if (w == 0.0) continue;
          total += w;
          const float* vj = &v[static_cast<size_t>(((b * Hkv + hk) * Skv + j) * D)];
          for (int64_t d = 0; d < D; ++d) out_row[d] += w * vj[d];
        }
        for (int64_t d = 0; d < D; ++d) {
          out_row[d] /= total;
          r.max_abs = std::max(r.max_abs, std::fabs(out_row[d]));
        }
        r.lse[static_cast<size_t>((b * Hq + h) * Sq + i)] = mx + std::log(total);
      }
    }
  return r;
}

// The shape and options of c (pointers, strides and the mask are the caller's).
AttentionParams base_params(const Case& c) {
  AttentionParams p;
  p.batch = c.batch;
  p.heads_q = c.heads_q;
  p.heads_kv = c.heads_kv;
  p.seq_q = c.seq_q;
  p.seq_kv = c.seq_kv;
  p.head_dim = c.head_dim;
  p.dtype = c.dtype;
  p.scale = static_cast<float>(c.scale != 0.f ? c.scale : 1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  p.causal = c.causal;
  p.window = c.window;
  p.softcap = c.softcap;
  return p;
}

// Checks the split-KV expectation of c against the workspace size; false (with a FAIL line) if
// it is not met.
bool check_split_plan(const Case& c, const std::string& text, int64_t workspace_floats, int sm_count) {
  if (workspace_floats < 0) {
    std::printf("FAIL %s\n  negative workspace size\n", text.c_str());
    return false;
  }
  if (c.expect_split && workspace_floats == 0 && sm_count >= 8) {
    std::printf("FAIL %s\n  expected the split-KV path (workspace > 0) on %d SMs\n", text.c_str(), sm_count);
    return false;
  }
  if (c.expect_single && workspace_floats > 0) {
    std::printf("FAIL %s\n  expected no split (workspace 0) on %d SMs\n", text.c_str(), sm_count);
    return false;
  }
  return true;
}

bool run_case(const Case& c, uint64_t seed, int sm_count) {
  Rng rng{seed};
  const int64_t B = c.batch, Hq = c.heads_q, Hkv = c.heads_kv, Sq = c.seq_q, Skv = c.seq_kv, D = c.head_dim;

  const Strided lq(c.layout, B, Hq, Sq, D, c.misaligned);
  const Strided lk(c.layout, B, Hkv, Skv, D, c.misaligned);
  const Strided lv(c.layout, B, Hkv, Skv, D, c.misaligned);
  const Strided lo(c.layout, B, Hq, Sq, D, c.misaligned);
  const std::vector<float> q = random_values(rng, lq.count(), -2.f, 2.f, c.dtype);
  const std::vector<float> k = random_values(rng, lk.count(), -1.f, 1.f, c.dtype);
  const std::vector<float> v = random_values(rng, lv.count(), -1.f, 1.f, c.dtype);
  HostMask mask;
  if (c.mask != MaskKind::none) mask = make_mask(c, rng);

  DeviceBuffer d_q(static_cast<size_t>(lq.storage) * 2), d_k(static_cast<size_t>(lk.storage) * 2),
      d_v(static_cast<size_t>(lv.storage) * 2), d_out(static_cast<size_t>(lo.storage) * 2),
      d_lse(static_cast<size_t>(std::max<int64_t>(B * Hq * Sq, 1)) * 4),
      d_mask(std::max<size_t>(mask.bytes.size(), 16));
  d_q.upload(lq.encode(q, c.dtype).data(), static_cast<size_t>(lq.storage) * 2);
  d_k.upload(lk.encode(k, c.dtype).data(), static_cast<size_t>(lk.storage) * 2);
  d_v.upload(lv.encode(v, c.dtype).data(), static_cast<size_t>(lv.storage) * 2);
  if (c.mask != MaskKind::none) d_mask.upload(mask.bytes.data(), mask.bytes.size());
  d_out.poison();
  d_lse.poison();

  AttentionParams p = base_params(c);
  p.q = static_cast<uint16_t*>(d_q.get()) + lq.offset;
  p.k = static_cast<uint16_t*>(d_k.get()) + lk.offset;
  p.v = static_cast<uint16_t*>(d_v.get()) + lv.offset;
  p.out = static_cast<uint16_t*>(d_out.get()) + lo.offset;
  p.lse = c.lse ? static_cast<float*>(d_lse.get()) : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = lq.strides[d];
    p.k_strides[d] = lk.strides[d];
    p.v_strides[d] = lv.strides[d];
    p.out_strides[d] = lo.strides[d];
  }
  if (c.mask != MaskKind::none) {
    p.mask_kind = c.mask;
    p.mask = d_mask.get();
    p.mask_dtype = c.mask_dtype;
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask.strides[d];
  }

  const std::string text = c.describe();
  const char* unsupported = transfuse::cuda::attention_forward_unsupported(p);
  if (unsupported[0] != '\0') {
    std::printf("FAIL %s\n  unsupported: %s\n", text.c_str(), unsupported);
    return false;
  }
  const int64_t workspace_floats = transfuse::cuda::attention_forward_workspace_floats(p);
  if (!check_split_plan(c, text, workspace_floats, sm_count)) return false;
  DeviceBuffer workspace(static_cast<size_t>(workspace_floats) * 4);
  workspace.poison();
  transfuse::cuda::attention_forward_launch(p, static_cast<float*>(workspace.get()), nullptr);
  check_cuda(cudaGetLastError(), "attention_forward_launch");
  check_cuda(cudaDeviceSynchronize(), "attention kernels");

  // ---- reference ----
  const double inf = std::numeric_limits<double>::infinity();
  const Reference reference = reference_attention(c, q, k, v, mask, 0);
  const std::vector<double>& ref = reference.out;
  const std::vector<double>& ref_lse = reference.lse;
  const double max_ref = reference.max_abs;

  // ---- compare ----
  int64_t failures = 0;
  auto fail = [&](const char* what, long long index, double got, double want, double tolerance) {
    if (failures == 0) std::printf("FAIL %s\n", text.c_str());
    if (failures < 8) {
      std::printf("  %s[%lld]: got %.9g, want %.9g (tolerance %.3g)\n", what, index, got, want, tolerance);
    }
    ++failures;
  };
  const std::vector<uint16_t> out_bits = d_out.download<uint16_t>();
  std::vector<uint8_t> covered(out_bits.size(), 0);
  const double out_tolerance = kOutTolerance * max_ref;
  double max_err = 0.0;
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Sq; ++i)
        for (int64_t d = 0; d < D; ++d, ++n) {
          const int64_t at = lo.at(b, h, i, d);
          covered[static_cast<size_t>(at)] = 1;
          const double got = from_bits(out_bits[static_cast<size_t>(at)], c.dtype);
          const double want = ref[static_cast<size_t>(n)];
          const double err = std::fabs(got - want);
          if (!(err <= out_tolerance)) {  // NaN fails here
            fail("out", static_cast<long long>(n), got, want, out_tolerance);
          }
          if (err == err) max_err = std::max(max_err, err);
        }
  for (size_t e = 0; e < out_bits.size(); ++e) {
    if (!covered[e] && out_bits[e] != 0xFFFFu) fail("out storage gap written", static_cast<long long>(e), 0, 0, 0);
  }
  double max_lse_err = 0.0;
  if (c.lse) {
    const std::vector<float> lse = d_lse.download<float>();
    for (int64_t r = 0; r < B * Hq * Sq; ++r) {
      const double got = lse[static_cast<size_t>(r)];
      const double want = ref_lse[static_cast<size_t>(r)];
      const double tolerance = kLseTolerance * (1.0 + std::fabs(want));
      if (want == inf) {
        if (got != inf) fail("lse", static_cast<long long>(r), got, want, 0);
      } else if (!(std::fabs(got - want) <= tolerance)) {
        fail("lse", static_cast<long long>(r), got, want, tolerance);
      } else {
        max_lse_err = std::max(max_lse_err, std::fabs(got - want));
      }
    }
  } else {
    const std::vector<uint32_t> lse_bits = d_lse.download<uint32_t>();
    for (size_t e = 0; e < lse_bits.size(); ++e) {
      if (lse_bits[e] != 0xFFFFFFFFu) fail("lse written though null", static_cast<long long>(e), 0, 0, 0);
    }
  }
  if (failures > 0) {
    if (failures > 8) std::printf("  ... %lld mismatches in all\n", static_cast<long long>(failures));
    return false;
  }
  std::printf("ok   %s\n     max|err| %.3g (max|ref| %.3g, tolerance %.3g), lse max|err| %.3g%s\n", text.c_str(),
              max_err, max_ref, out_tolerance, max_lse_err, workspace_floats > 0 ? ", split-KV" : "");
  return true;
}

// ---- the packed ("varlen") layout ----
// One call over sequences of lengths lens_q[b] / lens_kv[b]: q and out [total_q, Hq, D], k and v
// [total_kv, Hkv, D], rows heads * D + row_pad elements apart (NaN in the gaps), cu_seqlens in
// device memory, lse [Hq, total_q], the mask [B, Hq, max len_q, max len_kv] read in local
// positions. Each sequence's rows must match the double reference of that sequence alone (the
// tolerances above) and equal the padded call of that sequence alone ([1, H, len, D], the mask
// at batch b): exactly when neither call splits the keys (the same tiles and arithmetic; tiles a
// row cannot see add exact zeros), else within the tolerances.
struct VarlenCase {
  const char* name = "";
  Case options;  // dtype, heads, head_dim, causal, window, softcap, mask, expect_split / _single
  std::vector<int64_t> lens_q;
  std::vector<int64_t> lens_kv;
  int64_t row_pad = 0;  // 8: rows stay 16-byte aligned (a slice of a fused qkv); 4: they do not

  std::string describe() const {
    std::string text = std::string(name) + ": " + dtype_name(options.dtype);
    char part[200];
    std::snprintf(part, sizeof(part), " Hq=%lld Hkv=%lld D=%lld%s window=%lld softcap=%g mask=%s%s row_pad=%lld",
                  static_cast<long long>(options.heads_q), static_cast<long long>(options.heads_kv),
                  static_cast<long long>(options.head_dim), options.causal ? " causal" : "",
                  static_cast<long long>(options.window), options.softcap,
                  options.mask == MaskKind::none      ? "none"
                  : options.mask == MaskKind::boolean ? "bool"
                                                      : "additive-",
                  options.mask == MaskKind::additive ? dtype_name(options.mask_dtype) : "",
                  static_cast<long long>(row_pad));
    text += part;
    text += " lens q/kv";
    for (size_t b = 0; b < lens_q.size(); ++b) {
      std::snprintf(part, sizeof(part), " %lld/%lld", static_cast<long long>(lens_q[b]),
                    static_cast<long long>(lens_kv[b]));
      text += part;
    }
    return text;
  }
};

// Logical [rows, heads, d] values -> storage bits with rows `row_stride` elements apart, NaN in
// the gaps (8 elements of slack at the end).
std::vector<uint16_t> encode_rows(const std::vector<float>& values, int64_t rows, int64_t heads, int64_t d,
                                  int64_t row_stride, DType t) {
  std::vector<uint16_t> bits(static_cast<size_t>(rows * row_stride + 8), 0xFFFFu);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t e = 0; e < d; ++e) {
        bits[static_cast<size_t>(r * row_stride + h * d + e)] = to_bits(values[static_cast<size_t>((r * heads + h) * d + e)], t);
      }
  return bits;
}

// Rows start .. start + len - 1 of packed [rows, heads, d] values as [heads, len, d].
std::vector<float> sequence_rows(const std::vector<float>& packed, int64_t start, int64_t len, int64_t heads,
                                 int64_t d) {
  std::vector<float> out(static_cast<size_t>(heads * len * d));
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < len; ++i)
      for (int64_t e = 0; e < d; ++e) {
        out[static_cast<size_t>((h * len + i) * d + e)] = packed[static_cast<size_t>(((start + i) * heads + h) * d + e)];
      }
  return out;
}

// The padded call of one sequence (c.batch == 1, contiguous [1, H, S, D]); the mask, if any, at
// `mask` with `mask_strides`.
struct PaddedRun {
  std::vector<float> out;  // [Hq, Sq, D]
  std::vector<float> lse;  // [Hq, Sq]
  bool split = false;
  bool ok = false;
};

PaddedRun run_padded(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, const void* mask, const int64_t (&mask_strides)[4]) {
  PaddedRun run;
  const Strided lq(Layout::bhsd, 1, c.heads_q, c.seq_q, c.head_dim, false);
  const Strided lk(Layout::bhsd, 1, c.heads_kv, c.seq_kv, c.head_dim, false);
  DeviceBuffer d_q(static_cast<size_t>(lq.storage) * 2), d_k(static_cast<size_t>(lk.storage) * 2),
      d_v(static_cast<size_t>(lk.storage) * 2), d_out(static_cast<size_t>(lq.storage) * 2),
      d_lse(static_cast<size_t>(std::max<int64_t>(c.heads_q * c.seq_q, 1)) * 4);
  d_q.upload(lq.encode(q, c.dtype).data(), static_cast<size_t>(lq.storage) * 2);
  d_k.upload(lk.encode(k, c.dtype).data(), static_cast<size_t>(lk.storage) * 2);
  d_v.upload(lk.encode(v, c.dtype).data(), static_cast<size_t>(lk.storage) * 2);
  d_out.poison();
  d_lse.poison();
  AttentionParams p = base_params(c);
  p.q = d_q.get();
  p.k = d_k.get();
  p.v = d_v.get();
  p.out = d_out.get();
  p.lse = static_cast<float*>(d_lse.get());
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = lq.strides[d];
    p.k_strides[d] = lk.strides[d];
    p.v_strides[d] = lk.strides[d];
    p.out_strides[d] = lq.strides[d];
  }
  if (c.mask != MaskKind::none) {
    p.mask_kind = c.mask;
    p.mask = mask;
    p.mask_dtype = c.mask_dtype;
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask_strides[d];
  }
  if (transfuse::cuda::attention_forward_unsupported(p)[0] != '\0') return run;
  const int64_t workspace_floats = transfuse::cuda::attention_forward_workspace_floats(p);
  if (workspace_floats < 0) return run;
  DeviceBuffer workspace(static_cast<size_t>(workspace_floats) * 4);
  transfuse::cuda::attention_forward_launch(p, static_cast<float*>(workspace.get()), nullptr);
  check_cuda(cudaGetLastError(), "attention_forward_launch (padded, one sequence)");
  check_cuda(cudaDeviceSynchronize(), "attention kernels (padded, one sequence)");
  const std::vector<uint16_t> bits = d_out.download<uint16_t>();
  run.out.resize(static_cast<size_t>(lq.count()));
  for (size_t e = 0; e < run.out.size(); ++e) run.out[e] = from_bits(bits[e], c.dtype);
  run.lse = d_lse.download<float>();
  run.lse.resize(static_cast<size_t>(c.heads_q * c.seq_q));
  run.split = workspace_floats > 0;
  run.ok = true;
  return run;
}

bool run_varlen_case(const VarlenCase& vc, uint64_t seed, int sm_count) {
  Rng rng{seed};
  const Case& o = vc.options;
  const int64_t B = static_cast<int64_t>(vc.lens_q.size());
  const int64_t Hq = o.heads_q, Hkv = o.heads_kv, D = o.head_dim;
  std::vector<int32_t> cu_q(static_cast<size_t>(B + 1), 0), cu_k(static_cast<size_t>(B + 1), 0);
  int64_t max_q = 0, max_kv = 0;
  for (int64_t b = 0; b < B; ++b) {
    cu_q[b + 1] = cu_q[b] + static_cast<int32_t>(vc.lens_q[b]);
    cu_k[b + 1] = cu_k[b] + static_cast<int32_t>(vc.lens_kv[b]);
    max_q = std::max(max_q, vc.lens_q[b]);
    max_kv = std::max(max_kv, vc.lens_kv[b]);
  }
  const int64_t total_q = cu_q[B], total_kv = cu_k[B];
  const int64_t rq = Hq * D + vc.row_pad, rk = Hkv * D + vc.row_pad;  // row strides
  Case whole = o;  // the call's shape: B sequences of the largest lengths
  whole.batch = B;
  whole.seq_q = max_q;
  whole.seq_kv = max_kv;

  const std::vector<float> q = random_values(rng, total_q * Hq * D, -2.f, 2.f, o.dtype);
  const std::vector<float> k = random_values(rng, total_kv * Hkv * D, -1.f, 1.f, o.dtype);
  const std::vector<float> v = random_values(rng, total_kv * Hkv * D, -1.f, 1.f, o.dtype);
  HostMask mask;
  if (o.mask != MaskKind::none) mask = make_mask(whole, rng);
  const int64_t mask_bytes = o.mask == MaskKind::boolean ? 1 : o.mask_dtype == DType::f32 ? 4 : 2;

  const std::vector<uint16_t> q_bits = encode_rows(q, total_q, Hq, D, rq, o.dtype);
  const std::vector<uint16_t> k_bits = encode_rows(k, total_kv, Hkv, D, rk, o.dtype);
  const std::vector<uint16_t> v_bits = encode_rows(v, total_kv, Hkv, D, rk, o.dtype);
  DeviceBuffer d_q(q_bits.size() * 2), d_k(k_bits.size() * 2), d_v(v_bits.size() * 2), d_out(q_bits.size() * 2),
      d_lse(static_cast<size_t>(std::max<int64_t>(Hq * total_q, 1)) * 4), d_cu_q(cu_q.size() * 4),
      d_cu_k(cu_k.size() * 4), d_mask(std::max<size_t>(mask.bytes.size(), 16));
  d_q.upload(q_bits.data(), q_bits.size() * 2);
  d_k.upload(k_bits.data(), k_bits.size() * 2);
  d_v.upload(v_bits.data(), v_bits.size() * 2);
  d_cu_q.upload(cu_q.data(), cu_q.size() * 4);
  d_cu_k.upload(cu_k.data(), cu_k.size() * 4);
  if (o.mask != MaskKind::none) d_mask.upload(mask.bytes.data(), mask.bytes.size());
  d_out.poison();
  d_lse.poison();

  AttentionParams p = base_params(whole);
  p.q = d_q.get();
  p.k = d_k.get();
  p.v = d_v.get();
  p.out = d_out.get();
  p.lse = static_cast<float*>(d_lse.get());
  const int64_t q_strides[3] = {0, D, rq}, kv_strides[3] = {0, D, rk};
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = q_strides[d];
    p.k_strides[d] = kv_strides[d];
    p.v_strides[d] = kv_strides[d];
    p.out_strides[d] = q_strides[d];
  }
  if (o.mask != MaskKind::none) {
    p.mask_kind = o.mask;
    p.mask = d_mask.get();
    p.mask_dtype = o.mask_dtype;
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask.strides[d];
  }
  p.cu_seqlens_q = static_cast<const int32_t*>(d_cu_q.get());
  p.cu_seqlens_k = static_cast<const int32_t*>(d_cu_k.get());
  p.total_q = total_q;
  p.total_kv = total_kv;

  const std::string text = vc.describe();
  const char* unsupported = transfuse::cuda::attention_forward_unsupported(p);
  if (unsupported[0] != '\0') {
    std::printf("FAIL %s\n  unsupported: %s\n", text.c_str(), unsupported);
    return false;
  }
  const int64_t workspace_floats = transfuse::cuda::attention_forward_workspace_floats(p);
  if (!check_split_plan(o, text, workspace_floats, sm_count)) return false;
  const bool split = workspace_floats > 0;
  DeviceBuffer workspace(static_cast<size_t>(workspace_floats) * 4);
  workspace.poison();
  transfuse::cuda::attention_forward_launch(p, static_cast<float*>(workspace.get()), nullptr);
  check_cuda(cudaGetLastError(), "attention_forward_launch (packed)");
  check_cuda(cudaDeviceSynchronize(), "attention kernels (packed)");
  const std::vector<uint16_t> out_bits = d_out.download<uint16_t>();
  const std::vector<float> lse = d_lse.download<float>();

  // ---- each sequence alone: the reference and the padded call ----
  std::vector<Reference> refs;
  std::vector<PaddedRun> alone;
  double max_ref = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    Case cb = o;
    cb.batch = 1;
    cb.seq_q = vc.lens_q[b];
    cb.seq_kv = vc.lens_kv[b];
    const std::vector<float> qb = sequence_rows(q, cu_q[b], cb.seq_q, Hq, D);
    const std::vector<float> kb = sequence_rows(k, cu_k[b], cb.seq_kv, Hkv, D);
    const std::vector<float> vb = sequence_rows(v, cu_k[b], cb.seq_kv, Hkv, D);
    refs.push_back(reference_attention(cb, qb, kb, vb, mask, b));
    max_ref = std::max(max_ref, refs.back().max_abs);
    const void* mask_b = static_cast<const uint8_t*>(d_mask.get()) + b * mask.strides[0] * mask_bytes;
    alone.push_back(cb.seq_q > 0 ? run_padded(cb, qb, kb, vb, mask_b, mask.strides) : PaddedRun{});
  }

  // ---- compare ----
  const double inf = std::numeric_limits<double>::infinity();
  int64_t failures = 0;
  auto fail = [&](const char* what, long long b, long long index, double got, double want, double tolerance) {
    if (failures == 0) std::printf("FAIL %s\n", text.c_str());
    if (failures < 8) {
      std::printf("  %s (sequence %lld)[%lld]: got %.9g, want %.9g (tolerance %.3g)\n", what, b, index, got, want,
                  tolerance);
    }
    ++failures;
  };
  const double out_tolerance = kOutTolerance * max_ref;
  std::vector<uint8_t> covered(out_bits.size(), 0);
  double max_err = 0.0, max_lse_err = 0.0, max_diff = 0.0;
  int64_t exact_sequences = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Sq = vc.lens_q[b];
    if (Sq == 0) continue;
    const Reference& ref = refs[static_cast<size_t>(b)];
    const PaddedRun& run = alone[static_cast<size_t>(b)];
    if (!run.ok) {
      fail("the padded call of the sequence alone did not run", b, 0, 0, 0, 0);
      continue;
    }
    const bool exact = !split && !run.split;
    exact_sequences += exact ? 1 : 0;
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = (cu_q[b] + i) * rq + h * D + d;
          const int64_t n = (h * Sq + i) * D + d;
          covered[static_cast<size_t>(at)] = 1;
          const double got = from_bits(out_bits[static_cast<size_t>(at)], o.dtype);
          const double want = ref.out[static_cast<size_t>(n)];
          const double err = std::fabs(got - want);
          if (!(err <= out_tolerance)) fail("out vs reference", b, n, got, want, out_tolerance);  // NaN fails
          if (err == err) max_err = std::max(max_err, err);
          const double padded = run.out[static_cast<size_t>(n)];
          const double diff = std::fabs(got - padded);
          if (exact ? !(got == padded) : !(diff <= out_tolerance)) {
            fail("out vs the padded call alone", b, n, got, padded, exact ? 0.0 : out_tolerance);
          }
          if (diff == diff) max_diff = std::max(max_diff, diff);
        }
        const int64_t r = h * Sq + i;
        const double got = lse[static_cast<size_t>(h * total_q + cu_q[b] + i)];
        const double want = ref.lse[static_cast<size_t>(r)];
        const double tolerance = kLseTolerance * (1.0 + std::fabs(want));
        if (want == inf) {
          if (got != inf) fail("lse vs reference", b, r, got, want, 0);
        } else if (!(std::fabs(got - want) <= tolerance)) {
          fail("lse vs reference", b, r, got, want, tolerance);
        } else {
          max_lse_err = std::max(max_lse_err, std::fabs(got - want));
        }
        const double padded = run.lse[static_cast<size_t>(r)];
        const bool same = got == padded || (exact ? false : std::fabs(got - padded) <= tolerance);
        if (!same) fail("lse vs the padded call alone", b, r, got, padded, exact ? 0.0 : tolerance);
      }
  }
  for (size_t e = 0; e < out_bits.size(); ++e) {
    if (!covered[e] && out_bits[e] != 0xFFFFu) fail("out storage gap written", -1, static_cast<long long>(e), 0, 0, 0);
  }
  if (failures > 0) {
    if (failures > 8) std::printf("  ... %lld mismatches in all\n", static_cast<long long>(failures));
    return false;
  }
  std::printf("ok   %s\n     max|err| %.3g (max|ref| %.3g, tolerance %.3g), lse max|err| %.3g, max|packed - alone| "
              "%.3g (%lld of %lld sequences exact)%s\n",
              text.c_str(), max_err, max_ref, out_tolerance, max_lse_err, max_diff,
              static_cast<long long>(exact_sequences), static_cast<long long>(B), split ? ", split-KV" : "");
  return true;
}

std::vector<VarlenCase> all_varlen_cases() {
  std::vector<VarlenCase> cases;
  VarlenCase c;
  auto reset = [&](const char* name, DType dtype, int64_t hq, int64_t hkv, int64_t d) {
    c = VarlenCase{};
    c.name = name;
    c.options.dtype = dtype;
    c.options.heads_q = hq;
    c.options.heads_kv = hkv;
    c.options.head_dim = d;
  };

  // ---- prefill: the tensor-core tiles ----
  reset("varlen prefill, gqa", DType::f16, 4, 2, 128);
  c.lens_q = c.lens_kv = {0, 1, 17, 128, 129, 1000};
  cases.push_back(c);
  reset("varlen prefill causal, mqa, D 64 (128-row tiles)", DType::bf16, 4, 1, 64);
  c.options.causal = true;
  c.lens_q = c.lens_kv = {129, 0, 1000, 17, 1, 128};
  cases.push_back(c);
  reset("varlen causal len_q != len_kv (rows that see nothing)", DType::bf16, 2, 2, 128);
  c.options.causal = true;
  c.lens_q = {17, 1, 129, 0, 128, 5};
  c.lens_kv = {1000, 17, 129, 5, 0, 1};
  cases.push_back(c);
  reset("varlen window + softcap, D 64", DType::f16, 4, 2, 64);
  c.options.window = 100, c.options.softcap = 30.f;
  c.lens_q = {1000, 17, 129, 1};
  c.lens_kv = {1000, 129, 129, 1};
  cases.push_back(c);
  reset("varlen causal window, gqa", DType::bf16, 4, 2, 128);
  c.options.causal = true, c.options.window = 64;
  c.lens_q = {128, 1000, 0, 129};
  c.lens_kv = {128, 1000, 17, 300};
  cases.push_back(c);
  reset("varlen bool mask + causal, D 64", DType::f16, 2, 1, 64);
  c.options.causal = true, c.options.mask = MaskKind::boolean;
  c.lens_q = {129, 17, 1000};
  c.lens_kv = {300, 17, 1000};
  cases.push_back(c);
  reset("varlen additive bf16 mask, D 128", DType::bf16, 2, 2, 128);
  c.options.mask = MaskKind::additive, c.options.mask_dtype = DType::bf16;
  c.lens_q = {1, 128, 129, 0};
  c.lens_kv = {129, 128, 1, 17};
  cases.push_back(c);
  reset("varlen rows of a fused qkv (row stride + 8)", DType::f16, 2, 1, 64);
  c.options.causal = true, c.row_pad = 8;
  c.lens_q = c.lens_kv = {17, 129, 1};
  cases.push_back(c);
  reset("varlen unaligned rows (row stride + 4: scalar loads and stores)", DType::bf16, 2, 2, 64);
  c.row_pad = 4;
  c.lens_q = {17, 129, 1};
  c.lens_kv = {100, 129, 1000};
  cases.push_back(c);

  // ---- decoding: gqa rows, split-KV ----
  reset("varlen decode 1 query, gqa 4, causal, split-KV", DType::bf16, 32, 8, 128);
  c.options.causal = true, c.options.expect_split = true;
  c.lens_q = {1, 1, 1, 1, 1, 1, 1, 1};
  c.lens_kv = {0, 1, 17, 128, 129, 1000, 4096, 3000};
  cases.push_back(c);
  reset("varlen decode len_q <= 16, gqa 4, causal window, D 64, split-KV", DType::f16, 8, 2, 64);
  c.options.causal = true, c.options.window = 512, c.options.expect_split = true;
  c.lens_q = {16, 3, 0, 1, 7};
  c.lens_kv = {2048, 4000, 100, 1, 777};
  cases.push_back(c);
  reset("varlen decode, no gqa, softcap, split-KV", DType::f16, 4, 4, 128);
  c.options.softcap = 50.f, c.options.expect_split = true;
  c.lens_q = {1, 2, 1};
  c.lens_kv = {1000, 4096, 0};
  cases.push_back(c);
  reset("varlen decode, gqa 8 (two row tiles), additive f32 mask, D 64, split-KV", DType::bf16, 16, 2, 64);
  c.options.mask = MaskKind::additive, c.options.mask_dtype = DType::f32, c.options.expect_split = true;
  c.lens_q = {4, 1, 16};
  c.lens_kv = {1000, 4096, 129};
  cases.push_back(c);
  reset("varlen decode, gqa 4, many sequences (no split)", DType::bf16, 32, 8, 128);
  c.options.causal = true, c.options.expect_single = true;
  for (int b = 0; b < 48; ++b) {
    c.lens_q.push_back(1 + b % 3);
    c.lens_kv.push_back(b % 7 == 0 ? 0 : 17 + 61 * b);
  }
  cases.push_back(c);
  return cases;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  Case c;

  // ---- prefill shapes ----
  c = Case{};
  c.name = "basic";
  c.batch = 2, c.heads_q = 4, c.heads_kv = 4, c.seq_q = 128, c.seq_kv = 128, c.head_dim = 64;
  add(c);
  c = Case{};
  c.name = "one query, one key";
  c.dtype = DType::bf16;
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 1, c.seq_kv = 1, c.head_dim = 64;
  add(c);
  c = Case{};
  c.name = "gqa causal Sq<Skv, D tail";
  c.heads_q = 3, c.heads_kv = 1, c.seq_q = 17, c.seq_kv = 129, c.head_dim = 80, c.causal = true;
  add(c);
  c = Case{};
  c.name = "long causal gqa";
  c.dtype = DType::bf16;
  c.heads_q = 4, c.heads_kv = 2, c.seq_q = 1000, c.seq_kv = 1000, c.head_dim = 128, c.causal = true;
  add(c);
  c = Case{};
  c.name = "window + softcap, D 256";
  c.batch = 2, c.heads_q = 2, c.heads_kv = 1, c.seq_q = 129, c.seq_kv = 1000, c.head_dim = 256;
  c.window = 100, c.softcap = 30.f;
  add(c);
  c = Case{};
  c.name = "causal window, D 64 (128-row tiles, unmasked)";
  c.dtype = DType::bf16;
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 1000, c.seq_kv = 1000, c.head_dim = 64, c.causal = true, c.window = 256;
  add(c);
  c = Case{};
  c.name = "softcap + causal, gqa, D 128 (unmasked)";
  c.heads_q = 4, c.heads_kv = 2, c.seq_q = 129, c.seq_kv = 300, c.head_dim = 128, c.causal = true, c.softcap = 30.f;
  add(c);
  c = Case{};
  c.name = "window only, both sides skipped";
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 300, c.seq_kv = 300, c.head_dim = 128, c.window = 50;
  add(c);
  c = Case{};
  c.name = "causal, bshd layout, D 256";
  c.dtype = DType::bf16;
  c.batch = 2, c.heads_q = 2, c.heads_kv = 2, c.seq_q = 129, c.seq_kv = 129, c.head_dim = 256, c.causal = true;
  c.layout = Layout::bshd;
  add(c);
  c = Case{};
  c.name = "many heads and batches, bshd";
  c.dtype = DType::bf16;
  c.batch = 3, c.heads_q = 6, c.heads_kv = 3, c.seq_q = 130, c.seq_kv = 260, c.head_dim = 128, c.causal = true;
  c.layout = Layout::bshd;
  add(c);
  c = Case{};
  c.name = "head_dim 8, negative scale";
  c.heads_q = 2, c.heads_kv = 1, c.seq_q = 20, c.seq_kv = 20, c.head_dim = 8, c.scale = -0.3f;
  add(c);
  c = Case{};
  c.name = "head_dim 32";
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 150, c.seq_kv = 170, c.head_dim = 32, c.causal = true;
  add(c);
  c = Case{};
  c.name = "head_dim 96";
  c.dtype = DType::bf16;
  c.seq_q = 100, c.seq_kv = 130, c.head_dim = 96;
  add(c);
  c = Case{};
  c.name = "head_dim 192, softcap";
  c.seq_q = 70, c.seq_kv = 90, c.head_dim = 192, c.softcap = 20.f, c.causal = true;
  add(c);
  c = Case{};
  c.name = "head_dim 200 (bucket 256), causal Sq>Skv";
  c.dtype = DType::bf16;
  c.seq_q = 70, c.seq_kv = 50, c.head_dim = 200, c.causal = true;
  add(c);
  c = Case{};
  c.name = "causal Sq>Skv: most rows see nothing";
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 100, c.seq_kv = 17, c.head_dim = 64, c.causal = true;
  add(c);
  c = Case{};
  c.name = "seq_kv 0";
  c.batch = 2, c.heads_q = 2, c.heads_kv = 2, c.seq_q = 5, c.seq_kv = 0, c.head_dim = 64;
  add(c);
  c = Case{};
  c.name = "seq_q 0";
  c.batch = 2, c.heads_q = 2, c.heads_kv = 1, c.seq_q = 0, c.seq_kv = 10, c.head_dim = 64;
  add(c);
  c = Case{};
  c.name = "lse null";
  c.seq_q = 40, c.seq_kv = 40, c.head_dim = 64, c.lse = false;
  add(c);

  // ---- masks ----
  c = Case{};
  c.name = "bool mask, D 32";
  c.batch = 2, c.heads_q = 2, c.heads_kv = 2, c.seq_q = 200, c.seq_kv = 300, c.head_dim = 32;
  c.mask = MaskKind::boolean;
  add(c);
  c = Case{};
  c.name = "bool mask + causal, D 64";
  c.dtype = DType::bf16;
  c.batch = 2, c.heads_q = 4, c.heads_kv = 2, c.seq_q = 129, c.seq_kv = 200, c.head_dim = 64, c.causal = true;
  c.mask = MaskKind::boolean, c.mask_heads = false;
  add(c);
  c = Case{};
  c.name = "additive f32 mask over heads";
  c.dtype = DType::bf16;
  c.batch = 2, c.heads_q = 2, c.heads_kv = 1, c.seq_q = 65, c.seq_kv = 300, c.head_dim = 96;
  c.mask = MaskKind::additive, c.mask_dtype = DType::f32, c.mask_heads = false;
  add(c);
  c = Case{};
  c.name = "additive f32 mask, key stride != 1";
  c.batch = 1, c.heads_q = 2, c.heads_kv = 2, c.seq_q = 33, c.seq_kv = 150, c.head_dim = 128;
  c.mask = MaskKind::additive, c.mask_dtype = DType::f32, c.mask_transposed = true;
  add(c);
  c = Case{};
  c.name = "additive f16 padding mask + causal";
  c.batch = 2, c.heads_q = 2, c.heads_kv = 2, c.seq_q = 33, c.seq_kv = 77, c.head_dim = 64, c.causal = true;
  c.mask = MaskKind::additive, c.mask_dtype = DType::f16, c.mask_heads = false, c.mask_rows = false;
  add(c);
  c = Case{};
  c.name = "additive bf16 mask + softcap, D 192";
  c.dtype = DType::bf16;
  c.heads_q = 2, c.heads_kv = 1, c.seq_q = 40, c.seq_kv = 90, c.head_dim = 192, c.softcap = 20.f;
  c.mask = MaskKind::additive, c.mask_dtype = DType::bf16;
  add(c);
  c = Case{};
  c.name = "bool mask + window, D 256";
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 80, c.seq_kv = 200, c.head_dim = 256, c.window = 64;
  c.mask = MaskKind::boolean;
  add(c);

  // ---- layouts and alignment ----
  c = Case{};
  c.name = "padded rows (scalar loads and stores)";
  c.heads_q = 2, c.heads_kv = 1, c.seq_q = 50, c.seq_kv = 70, c.head_dim = 64, c.causal = true;
  c.layout = Layout::padded;
  add(c);
  c = Case{};
  c.name = "misaligned pointers";
  c.dtype = DType::bf16;
  c.heads_q = 2, c.heads_kv = 2, c.seq_q = 30, c.seq_kv = 129, c.head_dim = 128;
  c.misaligned = true;
  add(c);

  // ---- decoding: GQA rows packed, split-KV ----
  c = Case{};
  c.name = "decode 1 x 4096, gqa 4";
  c.heads_q = 8, c.heads_kv = 2, c.seq_q = 1, c.seq_kv = 4096, c.head_dim = 128, c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 1 x 4096, gqa 4, causal, D 64";
  c.dtype = DType::bf16;
  c.heads_q = 32, c.heads_kv = 8, c.seq_q = 1, c.seq_kv = 4096, c.head_dim = 64, c.causal = true;
  c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 4 x 4096, causal window, bool padding mask";
  c.batch = 2, c.heads_q = 4, c.heads_kv = 4, c.seq_q = 4, c.seq_kv = 4096, c.head_dim = 128, c.causal = true;
  c.window = 1000, c.mask = MaskKind::boolean, c.mask_heads = false, c.mask_rows = false;
  c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 16 x 2048, gqa 8 (two row tiles), additive f16 mask";
  c.dtype = DType::bf16;
  c.heads_q = 16, c.heads_kv = 2, c.seq_q = 16, c.seq_kv = 2048, c.head_dim = 128;
  c.mask = MaskKind::additive, c.mask_dtype = DType::f16, c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 3 x 4096, gqa 4, softcap, D 256";
  c.heads_q = 4, c.heads_kv = 1, c.seq_q = 3, c.seq_kv = 4096, c.head_dim = 256, c.softcap = 50.f, c.causal = true;
  c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 1 x 1000, misaligned, D 80";
  c.dtype = DType::bf16;
  c.heads_q = 2, c.heads_kv = 1, c.seq_q = 1, c.seq_kv = 1000, c.head_dim = 80, c.misaligned = true;
  c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 2 x 777, padded layout, lse null";
  c.heads_q = 4, c.heads_kv = 2, c.seq_q = 2, c.seq_kv = 777, c.head_dim = 64, c.layout = Layout::padded;
  c.lse = false;
  add(c);
  c = Case{};
  c.name = "decode 1 x 8192, gqa 4, causal window + softcap (splits start past tile 0)";
  c.heads_q = 8, c.heads_kv = 2, c.seq_q = 1, c.seq_kv = 8192, c.head_dim = 128, c.causal = true;
  c.window = 2048, c.softcap = 50.f, c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 5 x 3000, gqa 4, causal window, D 64";
  c.dtype = DType::bf16;
  c.heads_q = 16, c.heads_kv = 4, c.seq_q = 5, c.seq_kv = 3000, c.head_dim = 64, c.causal = true;
  c.window = 700, c.expect_split = true;
  add(c);
  c = Case{};
  c.name = "decode 1 x 300, gqa 4, many batches (no split)";
  c.dtype = DType::bf16;
  c.batch = 48, c.heads_q = 32, c.heads_kv = 8, c.seq_q = 1, c.seq_kv = 300, c.head_dim = 128, c.causal = true;
  c.expect_single = true;
  add(c);
  return cases;
}

// attention_forward_unsupported's rules (python/transfuse/ops/attention.py mirrors the first,
// second and fourth); host only.
bool check_unsupported() {
  AttentionParams p;
  p.dtype = DType::f16;
  p.head_dim = 64;
  bool ok = true;
  auto expect = [&](bool supported, const char* what) {
    const bool got = transfuse::cuda::attention_forward_unsupported(p)[0] == '\0';
    if (got != supported) {
      std::printf("FAIL attention_forward_unsupported: %s should be %s\n", what,
                  supported ? "supported" : "unsupported");
      ok = false;
    }
  };
  expect(true, "f16 head_dim 64");
  p.dtype = DType::bf16;
  p.head_dim = 256;
  expect(true, "bf16 head_dim 256");
  p.head_dim = 8;
  expect(true, "bf16 head_dim 8");
  p.dtype = DType::f32;
  expect(false, "f32");
  p.dtype = DType::f16;
  p.head_dim = 12;
  expect(false, "head_dim 12");
  p.head_dim = 264;
  expect(false, "head_dim 264");
  p.head_dim = 64;
  p.dropout_p = 0.1f;
  expect(false, "dropout 0.1");
  p.dropout_p = 0.f;
  const int32_t cu_seqlens[2] = {0, 1};  // never read: the rules look at the pointers only
  p.cu_seqlens_q = cu_seqlens;
  expect(false, "cu_seqlens_q without cu_seqlens_k");
  p.cu_seqlens_k = cu_seqlens;
  expect(true, "the packed layout");
  p.cu_seqlens_q = nullptr;
  expect(false, "cu_seqlens_k without cu_seqlens_q");
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
  for (const Case& c : all_cases()) {
    if (run_case(c, seed++, sm_count)) {
      ++passed;
    } else {
      ++failed;
    }
  }
  for (const VarlenCase& c : all_varlen_cases()) {
    if (run_varlen_case(c, seed++, sm_count)) {
      ++passed;
    } else {
      ++failed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
