// Torch-free unit test of the CPU attention kernels (cpu/attention.cpp), forward and backward,
// against a naive double-precision reference written out here from the math in
// common/attention.h: fp32 inputs over awkward shapes, GQA, causal with seq_q < seq_kv and
// seq_q > seq_kv, bool and additive masks, sliding window, softcap, dropout and the split-KV
// decode path. Then the packed ("varlen") layout: one call over sequences of mixed lengths (0, 1,
// 17, 129, ...) equals the padded call of each sequence. Outputs are filled with NaN before the
// kernel runs, so an element the kernel forgets to write fails. (The dtype conversions are tested
// by test_norm_cpu and the Python tests.)
//
//   cmake -S . -B build/cmake && cmake --build build/cmake --target test_attention_cpu
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/attention.h"

using transfuse::AttentionBackwardParams;
using transfuse::AttentionParams;
using transfuse::MaskKind;

namespace {

struct Case {
  std::string name;
  int64_t batch, heads_q, heads_kv, seq_q, seq_kv, head_dim;
  MaskKind mask = MaskKind::none;
  bool causal = false;
  int64_t window = 0;
  float softcap = 0.f;
  float dropout_p = 0.f;
  int threads = 3;
};

struct Tensors {
  std::vector<float> q, k, v, mask_values, dout;
  std::vector<uint8_t> mask_bits;
};

// Index of element (b, h, i, d) in a contiguous [B, H, S, D] tensor.
int64_t at(int64_t b, int64_t h, int64_t i, int64_t d, int64_t heads, int64_t seq, int64_t dim) {
  return ((b * heads + h) * seq + i) * dim + d;
}

// Naive forward and backward in double; returns out, lse, dq, dk, dv, dbias.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv, dbias;
};

Reference reference(const Case& c, const Tensors& t, float scale) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  Reference r;
  r.out.assign(c.batch * c.heads_q * c.seq_q * c.head_dim, 0.0);
  r.lse.assign(c.batch * c.heads_q * c.seq_q, std::numeric_limits<double>::infinity());
  r.dq.assign(r.out.size(), 0.0);
  r.dk.assign(c.batch * c.heads_kv * c.seq_kv * c.head_dim, 0.0);
  r.dv.assign(r.dk.size(), 0.0);
  r.dbias.assign(c.batch * c.heads_q * c.seq_q * c.seq_kv, 0.0);
  const uint32_t threshold = transfuse::dropout_threshold(c.dropout_p);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < c.heads_q; ++h) {
      const int64_t kh = h / (c.heads_q / c.heads_kv);
      for (int64_t i = 0; i < c.seq_q; ++i) {
        std::vector<double> s(c.seq_kv, neg_inf), raw(c.seq_kv, 0.0), p(c.seq_kv, 0.0);
        const int64_t diagonal = i + c.seq_kv - c.seq_q;
        for (int64_t j = 0; j < c.seq_kv; ++j) {
          const int64_t mask_index = (b * c.heads_q + h) * c.seq_q * c.seq_kv + i * c.seq_kv + j;
          if (c.causal && j > diagonal) continue;
          if (c.window > 0 && std::abs(diagonal - j) >= c.window) continue;
          if (c.mask == MaskKind::boolean && !t.mask_bits[mask_index]) continue;
          double dot = 0;
          for (int64_t d = 0; d < c.head_dim; ++d)
            dot += double(t.q[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)]) *
                   t.k[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)];
          raw[j] = scale * dot;
          s[j] = c.softcap > 0 ? c.softcap * std::tanh(raw[j] / c.softcap) : raw[j];
          if (c.mask == MaskKind::additive) s[j] += t.mask_values[mask_index];
        }
        const double m = *std::max_element(s.begin(), s.end());
        if (m == neg_inf) continue;  // no visible key: zeros, lse = +inf, no gradient
        double sum = 0;
        for (int64_t j = 0; j < c.seq_kv; ++j) sum += std::exp(s[j] - m);
        r.lse[(b * c.heads_q + h) * c.seq_q + i] = m + std::log(sum);
        const uint32_t row_key = transfuse::dropout_row_key(
            0x1234u, uint32_t(b * c.heads_q + h), uint32_t(i));
        std::vector<double> keep(c.seq_kv, 1.0);
        for (int64_t j = 0; j < c.seq_kv; ++j) {
          p[j] = std::exp(s[j] - m) / sum;
          if (c.dropout_p > 0)
            keep[j] = transfuse::dropout_bits(row_key, uint32_t(j)) >= threshold
                          ? 1.0 / (1.0 - c.dropout_p) : 0.0;
        }
        // out = sum_j p_drop v;  backward with dO: dP, delta = <dO, out>, dS, dQ, dK, dV.
        std::vector<double> dp(c.seq_kv, 0.0);
        double delta = 0;
        for (int64_t d = 0; d < c.head_dim; ++d) {
          double value = 0;
          for (int64_t j = 0; j < c.seq_kv; ++j)
            value += p[j] * keep[j] * t.v[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)];
          r.out[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)] = value;
          delta += value * t.dout[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)];
        }
        for (int64_t j = 0; j < c.seq_kv; ++j) {
          for (int64_t d = 0; d < c.head_dim; ++d) {
            const double g = t.dout[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)];
            dp[j] += g * t.v[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)] * keep[j];
            r.dv[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)] += p[j] * keep[j] * g;
          }
          const double ds = p[j] * (dp[j] - delta);
          r.dbias[(b * c.heads_q + h) * c.seq_q * c.seq_kv + i * c.seq_kv + j] = ds;
          double ds_raw = ds;
          if (c.softcap > 0) {
            const double th = std::tanh(raw[j] / c.softcap);
            ds_raw *= 1 - th * th;
          }
          for (int64_t d = 0; d < c.head_dim; ++d) {
            r.dq[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)] +=
                scale * ds_raw * t.k[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)];
            r.dk[at(b, kh, j, d, c.heads_kv, c.seq_kv, c.head_dim)] +=
                scale * ds_raw * t.q[at(b, h, i, d, c.heads_q, c.seq_q, c.head_dim)];
          }
        }
      }
    }
  return r;
}

// max |got - want| <= tolerance * (1 + max |want|); NaN fails.
bool close(const char* name, const std::string& case_name, const float* got,
           const std::vector<double>& want, double tolerance) {
  double error = 0, largest = 0;
  for (size_t n = 0; n < want.size(); ++n) {
    const double diff = std::isinf(want[n]) && got[n] == want[n] ? 0.0 : std::fabs(got[n] - want[n]);
    error = std::isnan(diff) || std::isnan(error) ? NAN : std::max(error, diff);
    if (std::isfinite(want[n])) largest = std::max(largest, std::fabs(want[n]));
  }
  const bool ok = error <= tolerance * (1 + largest);
  if (!ok) std::printf("FAIL %s %s: max error %.3g (max |ref| %.3g)\n", case_name.c_str(), name,
                       error, largest);
  return ok;
}

bool run(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  Tensors t;
  auto fill = [&](std::vector<float>& x, int64_t n) {
    x.resize(n);
    for (auto& value : x) value = normal(rng);
  };
  fill(t.q, c.batch * c.heads_q * c.seq_q * c.head_dim);
  fill(t.k, c.batch * c.heads_kv * c.seq_kv * c.head_dim);
  fill(t.v, t.k.size());
  fill(t.dout, t.q.size());
  const int64_t mask_size = c.batch * c.heads_q * c.seq_q * c.seq_kv;
  fill(t.mask_values, mask_size);
  t.mask_bits.resize(mask_size);
  for (auto& bit : t.mask_bits) bit = rng() % 4 != 0;  // a quarter hidden, some rows fully

  const float scale = 1.f / std::sqrt(float(c.head_dim));
  AttentionParams p;
  p.q = t.q.data();
  p.k = t.k.data();
  p.v = t.v.data();
  const int64_t q_strides[3] = {c.heads_q * c.seq_q * c.head_dim, c.seq_q * c.head_dim, c.head_dim};
  const int64_t k_strides[3] = {c.heads_kv * c.seq_kv * c.head_dim, c.seq_kv * c.head_dim,
                                c.head_dim};
  std::copy(q_strides, q_strides + 3, p.q_strides);
  std::copy(q_strides, q_strides + 3, p.out_strides);
  std::copy(k_strides, k_strides + 3, p.k_strides);
  std::copy(k_strides, k_strides + 3, p.v_strides);
  p.mask_kind = c.mask;
  p.mask = c.mask == MaskKind::boolean ? static_cast<const void*>(t.mask_bits.data())
                                       : static_cast<const void*>(t.mask_values.data());
  const int64_t mask_strides[4] = {c.heads_q * c.seq_q * c.seq_kv, c.seq_q * c.seq_kv, c.seq_kv, 1};
  std::copy(mask_strides, mask_strides + 4, p.mask_strides);
  p.batch = c.batch;
  p.heads_q = c.heads_q;
  p.heads_kv = c.heads_kv;
  p.seq_q = c.seq_q;
  p.seq_kv = c.seq_kv;
  p.head_dim = c.head_dim;
  p.scale = scale;
  p.causal = c.causal;
  p.window = c.window;
  p.softcap = c.softcap;
  p.dropout_p = c.dropout_p;
  p.dropout_seed = 0x1234u;
  p.num_threads = c.threads;

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(t.q.size(), nan), lse(c.batch * c.heads_q * c.seq_q, nan);
  p.out = out.data();
  p.lse = lse.data();
  transfuse::cpu::attention_forward(p);

  AttentionBackwardParams bp;
  bp.forward = p;
  bp.dout = t.dout.data();
  std::copy(q_strides, q_strides + 3, bp.dout_strides);
  std::vector<float> dq(t.q.size(), nan), dk(t.k.size(), nan), dv(t.k.size(), nan),
      dbias(mask_size, nan);
  bp.dq = dq.data();
  bp.dk = dk.data();
  bp.dv = dv.data();
  bp.dbias = dbias.data();
  transfuse::cpu::attention_backward(bp);

  const Reference r = reference(c, t, scale);
  const double tolerance = 2e-5;
  bool ok = close("out", c.name, out.data(), r.out, tolerance);
  ok &= close("lse", c.name, lse.data(), r.lse, tolerance);
  ok &= close("dq", c.name, dq.data(), r.dq, tolerance);
  ok &= close("dk", c.name, dk.data(), r.dk, tolerance);
  ok &= close("dv", c.name, dv.data(), r.dv, tolerance);
  ok &= close("dbias", c.name, dbias.data(), r.dbias, tolerance);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name.c_str());
  return ok;
}

// ------------------------------------------------------------------------------------------------
// Packed layout: q [total_q, Hq, D], k / v [total_kv, Hkv, D] with offsets cu_seqlens. Sequence b
// must equal the padded call of that sequence alone as batch entry b: a padded call of b + 1
// entries that all alias sequence b (batch stride 0), so it reads mask[b] and draws b's dropout.
// ------------------------------------------------------------------------------------------------

struct PackedCase {
  std::string name;
  std::vector<int32_t> q_lens, kv_lens;
  int64_t heads_q, heads_kv, head_dim;
  MaskKind mask = MaskKind::none;
  bool causal = false;
  int64_t window = 0;
  float softcap = 0.f;
  float dropout_p = 0.f;
};

// The forward and backward outputs of one call.
struct Outputs {
  std::vector<float> out, lse, dq, dk, dv, dbias;
};

// Runs forward then backward on p (inputs set), into NaN-filled outputs of the given sizes;
// gradient layouts as the kernels write them (contiguous).
Outputs forward_backward(const AttentionParams& p, const void* dout, const int64_t* dout_strides,
                         int64_t q_elements, int64_t kv_elements, int64_t lse_rows,
                         int64_t bias_elements) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Outputs o{std::vector<float>(q_elements, nan), std::vector<float>(lse_rows, nan),
            std::vector<float>(q_elements, nan), std::vector<float>(kv_elements, nan),
            std::vector<float>(kv_elements, nan), std::vector<float>(bias_elements, nan)};
  AttentionBackwardParams bp;
  bp.forward = p;
  bp.forward.out = o.out.data();
  bp.forward.lse = o.lse.data();
  transfuse::cpu::attention_forward(bp.forward);
  bp.dout = dout;
  std::copy(dout_strides, dout_strides + 3, bp.dout_strides);
  bp.dq = o.dq.data();
  bp.dk = o.dk.data();
  bp.dv = o.dv.data();
  bp.dbias = o.dbias.data();
  transfuse::cpu::attention_backward(bp);
  return o;
}

bool run_packed(const PackedCase& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t batch = int64_t(c.q_lens.size()), hq = c.heads_q, hkv = c.heads_kv,
                dim = c.head_dim;
  std::vector<int32_t> cu_q{0}, cu_k{0};
  for (int64_t b = 0; b < batch; ++b) {
    cu_q.push_back(cu_q.back() + c.q_lens[b]);
    cu_k.push_back(cu_k.back() + c.kv_lens[b]);
  }
  const int64_t total_q = cu_q.back(), total_kv = cu_k.back();
  const int64_t max_q = batch ? *std::max_element(c.q_lens.begin(), c.q_lens.end()) : 0;
  const int64_t max_kv = batch ? *std::max_element(c.kv_lens.begin(), c.kv_lens.end()) : 0;
  Tensors t;
  auto fill = [&](std::vector<float>& x, int64_t n) {
    x.resize(n);
    for (auto& value : x) value = normal(rng);
  };
  fill(t.q, total_q * hq * dim);
  fill(t.k, total_kv * hkv * dim);
  fill(t.v, t.k.size());
  fill(t.dout, t.q.size());
  const int64_t mask_size = batch * hq * max_q * max_kv;
  fill(t.mask_values, mask_size);
  t.mask_bits.resize(mask_size);
  for (auto& bit : t.mask_bits) bit = rng() % 4 != 0;

  // Packed rows: row r of head h at r * H * D + h * D (no batch stride).
  const int64_t q_strides[3] = {0, dim, hq * dim}, kv_strides[3] = {0, dim, hkv * dim};
  AttentionParams p;
  p.q = t.q.data();
  p.k = t.k.data();
  p.v = t.v.data();
  std::copy(q_strides, q_strides + 3, p.q_strides);
  std::copy(q_strides, q_strides + 3, p.out_strides);
  std::copy(kv_strides, kv_strides + 3, p.k_strides);
  std::copy(kv_strides, kv_strides + 3, p.v_strides);
  p.mask_kind = c.mask;
  p.mask = c.mask == MaskKind::boolean ? static_cast<const void*>(t.mask_bits.data())
                                       : static_cast<const void*>(t.mask_values.data());
  const int64_t mask_strides[4] = {hq * max_q * max_kv, max_q * max_kv, max_kv, 1};
  std::copy(mask_strides, mask_strides + 4, p.mask_strides);
  p.batch = batch;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.seq_q = max_q;
  p.seq_kv = max_kv;
  p.head_dim = dim;
  p.scale = 1.f / std::sqrt(float(dim));
  p.causal = c.causal;
  p.window = c.window;
  p.softcap = c.softcap;
  p.dropout_p = c.dropout_p;
  p.dropout_seed = 0x1234u;
  p.num_threads = 3;
  p.cu_seqlens_q = cu_q.data();
  p.cu_seqlens_k = cu_k.data();
  p.total_q = total_q;
  p.total_kv = total_kv;
  const Outputs packed = forward_backward(p, t.dout.data(), q_strides, t.q.size(), t.k.size(),
                                          hq * total_q, mask_size);

  // Gathered in the packed layout from the padded calls (dbias 0 outside each sequence's lengths).
  std::vector<double> out(t.q.size()), lse(hq * total_q), dq(t.q.size()), dk(t.k.size()),
      dv(t.k.size()), dbias(mask_size, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len_q = c.q_lens[b], len_kv = c.kv_lens[b], q0 = cu_q[b], k0 = cu_k[b];
    AttentionParams s = p;
    s.cu_seqlens_q = s.cu_seqlens_k = nullptr;
    s.batch = b + 1;
    s.seq_q = len_q;
    s.seq_kv = len_kv;
    s.q = t.q.data() + q0 * hq * dim;
    s.k = t.k.data() + k0 * hkv * dim;
    s.v = t.v.data() + k0 * hkv * dim;
    const int64_t out_strides[3] = {hq * len_q * dim, len_q * dim, dim};
    std::copy(out_strides, out_strides + 3, s.out_strides);
    const Outputs padded = forward_backward(s, t.dout.data() + q0 * hq * dim, q_strides,
                                            (b + 1) * hq * len_q * dim,
                                            (b + 1) * hkv * len_kv * dim, (b + 1) * hq * len_q,
                                            (b + 1) * hq * len_q * len_kv);
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < len_q; ++i) {
        const int64_t row = (b * hq + h) * len_q + i;  // of entry b in the padded outputs
        lse[h * total_q + q0 + i] = padded.lse[row];
        for (int64_t d = 0; d < dim; ++d) {
          out[((q0 + i) * hq + h) * dim + d] = padded.out[row * dim + d];
          dq[((q0 + i) * hq + h) * dim + d] = padded.dq[row * dim + d];
        }
        for (int64_t j = 0; j < len_kv; ++j)
          dbias[((b * hq + h) * max_q + i) * max_kv + j] = padded.dbias[row * len_kv + j];
      }
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t j = 0; j < len_kv; ++j)
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t from = ((b * hkv + h) * len_kv + j) * dim + d;
          dk[((k0 + j) * hkv + h) * dim + d] = padded.dk[from];
          dv[((k0 + j) * hkv + h) * dim + d] = padded.dv[from];
        }
  }
  const double tolerance = 1e-5;
  bool ok = close("out", c.name, packed.out.data(), out, tolerance);
  ok &= close("lse", c.name, packed.lse.data(), lse, tolerance);
  ok &= close("dq", c.name, packed.dq.data(), dq, tolerance);
  ok &= close("dk", c.name, packed.dk.data(), dk, tolerance);
  ok &= close("dv", c.name, packed.dv.data(), dv, tolerance);
  ok &= close("dbias", c.name, packed.dbias.data(), dbias, tolerance);
  std::printf("%s packed %s\n", ok ? "ok  " : "FAIL", c.name.c_str());
  return ok;
}

}  // namespace

int main() {
  std::mt19937 rng(20261122);
  std::vector<Case> cases = {
      {"plain b2 h3 q17 k17 d64", 2, 3, 3, 17, 17, 64},
      {"gqa4 causal q129 k200 d80", 1, 8, 2, 129, 200, 80},
      {"mqa causal q200 k129 d16", 1, 4, 1, 200, 129, 16},
      {"bool mask q70 k150 d96", 2, 2, 1, 70, 150, 96},
      {"additive mask causal q1 k300 d32", 1, 2, 2, 1, 300, 32, MaskKind::additive, true},
      {"window causal q140 k140 d64", 1, 2, 1, 140, 140, 64, MaskKind::none, true, 9},
      {"window q33 k90 d24", 1, 2, 2, 33, 90, 24, MaskKind::none, false, 5},
      {"softcap bool q40 k70 d128", 1, 2, 2, 40, 70, 128, MaskKind::boolean, false, 0, 5.f},
      {"dropout causal q65 k130 d64", 1, 2, 1, 65, 130, 64, MaskKind::none, true, 0, 0.f, 0.25f},
      {"decode split q1 k2000 d256", 1, 1, 1, 1, 2000, 256},
      {"decode split bool q3 k1500 d64", 1, 2, 1, 3, 1500, 64, MaskKind::boolean},
      {"one key q5 k1 d8", 1, 1, 1, 5, 1, 8},
  };
  cases.back().threads = 1;
  // Lengths mix 0, 1, 17, 129: empty sequences (no query rows; no keys under query rows), seq_q <
  // seq_kv and seq_q > seq_kv within one call, several query tiles.
  const std::vector<PackedCase> packed_cases = {
      {"gqa mixed lengths d64", {17, 0, 1, 129, 17, 40}, {17, 5, 0, 129, 60, 40}, 4, 2, 64},
      {"mqa causal d80", {129, 1, 0, 17, 40}, {129, 17, 0, 40, 17}, 4, 1, 80, MaskKind::none,
       true},
      {"window causal d64", {129, 17, 1, 0}, {129, 30, 129, 2}, 2, 1, 64, MaskKind::none, true, 9},
      {"window d32", {17, 129, 5}, {40, 129, 1}, 2, 2, 32, MaskKind::none, false, 7},
      {"bool mask softcap d128", {17, 129, 0, 1}, {20, 129, 3, 1}, 2, 2, 128, MaskKind::boolean,
       false, 0, 5.f},
      {"additive mask dropout causal d16", {65, 17, 1, 129}, {130, 17, 200, 129}, 4, 2, 16,
       MaskKind::additive, true, 0, 0.f, 0.25f},
      {"decode split", {1, 0, 2}, {1500, 0, 700}, 1, 1, 64},
      {"only empty query rows", {0, 0}, {0, 5}, 2, 1, 16},
      {"no sequences", {}, {}, 2, 1, 16},
  };
  bool ok = true;
  for (const char* isa : {"", "avx2", "baseline"}) {  // every vector variant (where the CPU has it)
    setenv("TRANSFUSE_CPU_ISA", isa, 1);
    std::printf("TRANSFUSE_CPU_ISA=%s\n", isa);
    for (const Case& c : cases) ok &= run(c, rng);
    for (const PackedCase& c : packed_cases) ok &= run_packed(c, rng);
  }
  std::printf(ok ? "all attention CPU tests passed\n" : "attention CPU tests FAILED\n");
  return ok ? 0 : 1;
}
