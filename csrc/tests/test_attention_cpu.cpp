// Torch-free unit test of the CPU attention kernels (cpu/attention.cpp), forward and backward,
// against a naive double-precision reference written out here from the math in
// common/attention.h: fp32 inputs over awkward shapes, GQA, causal with seq_q < seq_kv and
// seq_q > seq_kv, bool and additive masks, sliding window, softcap, dropout and the split-KV
// decode path. Outputs are filled with NaN before the kernel runs, so an element the kernel forgets
// to write fails. (The dtype conversions are tested by test_norm_cpu and the Python tests.)
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
bool close(const char* name, const Case& c, const float* got, const std::vector<double>& want,
           double tolerance) {
  double error = 0, largest = 0;
  for (size_t n = 0; n < want.size(); ++n) {
    const double diff = std::isinf(want[n]) && got[n] == want[n] ? 0.0 : std::fabs(got[n] - want[n]);
    error = std::isnan(diff) || std::isnan(error) ? NAN : std::max(error, diff);
    if (std::isfinite(want[n])) largest = std::max(largest, std::fabs(want[n]));
  }
  const bool ok = error <= tolerance * (1 + largest);
  if (!ok) std::printf("FAIL %s %s: max error %.3g (max |ref| %.3g)\n", c.name.c_str(), name, error,
                       largest);
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
  bool ok = close("out", c, out.data(), r.out, tolerance);
  ok &= close("lse", c, lse.data(), r.lse, tolerance);
  ok &= close("dq", c, dq.data(), r.dq, tolerance);
  ok &= close("dk", c, dk.data(), r.dk, tolerance);
  ok &= close("dv", c, dv.data(), r.dv, tolerance);
  ok &= close("dbias", c, dbias.data(), r.dbias, tolerance);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name.c_str());
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
  bool ok = true;
  for (const char* isa : {"", "avx2", "baseline"}) {  // every vector variant (where the CPU has it)
    setenv("TRANSFUSE_CPU_ISA", isa, 1);
    std::printf("TRANSFUSE_CPU_ISA=%s\n", isa);
    for (const Case& c : cases) ok &= run(c, rng);
  }
  std::printf(ok ? "all attention CPU tests passed\n" : "attention CPU tests FAILED\n");
  return ok ? 0 : 1;
}
