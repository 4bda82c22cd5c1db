#include "amx.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "transpose_avx512.h"

namespace transfuse::cpu {

namespace {

constexpr unsigned kAmxTile = 1u << 24, kAmxInt8 = 1u << 25;  // CPUID.(EAX=7, ECX=0):EDX
constexpr long kArchRequestComponentPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
constexpr long kTileDataComponent = 18;                   // XFEATURE_XTILEDATA

bool cpu_has_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned wanted = kAmxTile | kAmxInt8;
  return (edx & wanted) == wanted;
}

}  // namespace

bool has_amx() {
  static const bool usable = [] {
    const char* asked = std::getenv("TRANSFUSE_CPU_ISA");
    if (asked != nullptr && std::strcmp(asked, "amx") != 0) return false;
    if (vector_isa() != VectorIsa::avx512 || !cpu_has_amx()) return false;
    return syscall(SYS_arch_prctl, kArchRequestComponentPermission, kTileDataComponent) == 0;
  }();
  return usable;
}

__attribute__((target("avx512f,avx512bw"))) void pack_words(const void* x, int64_t m,
                                                         int64_t row_bytes, int64_t words,
                                                         int64_t m_pad, uint32_t* xt) {
  const auto* bytes = static_cast<const uint8_t*>(x);
  for (int64_t t0 = 0; t0 < m_pad; t0 += 16)  // 16 tokens x 16 words at a time: a transpose
    for (int64_t g0 = 0; g0 < words; g0 += 16) {
      const int64_t inside = std::clamp<int64_t>(row_bytes - 4 * g0, 0, 64);
      const __mmask64 mask = inside == 64 ? ~__mmask64(0) : (__mmask64(1) << inside) - 1;
      __m512i rows[16], columns[16];
      for (int64_t l = 0; l < 16; ++l)
        rows[l] = t0 + l < m ? _mm512_maskz_loadu_epi8(mask, bytes + (t0 + l) * row_bytes + 4 * g0)
                             : _mm512_setzero_si512();
      transpose16(rows, columns);
      for (int64_t g = 0; g < 16; ++g) _mm512_storeu_si512(xt + (g0 + g) * m_pad + t0, columns[g]);
    }
}

const uint8_t* weight_panel(const void* w, int64_t n, int64_t row_bytes, int64_t j0,
                            std::vector<uint8_t>& copy, int64_t* stride_out) {
  const auto* bytes = static_cast<const uint8_t*>(w);
  if (row_bytes % 64 == 0 && j0 + kAmxPanelRows <= n) {
    *stride_out = row_bytes;
    return bytes + j0 * row_bytes;
  }
  const int64_t stride = (row_bytes + 63) / 64 * 64;
  copy.assign(kAmxPanelRows * stride, 0);
  for (int64_t r = 0; r < std::min(kAmxPanelRows, n - j0); ++r)
    std::memcpy(copy.data() + r * stride, bytes + (j0 + r) * row_bytes, row_bytes);
  *stride_out = stride;
  return copy.data();
}

__attribute__((target("avx512f"))) void transpose_block(
    const uint32_t sums_t[kAmxPanelRows][kAmxTokens], uint32_t sums[kAmxTokens][kAmxPanelRows]) {
  for (int64_t a = 0; a < kAmxPanelRows; a += 16)
    for (int64_t b = 0; b < kAmxTokens; b += 16) {
      __m512i rows[16], columns[16];
      for (int l = 0; l < 16; ++l) rows[l] = _mm512_loadu_si512(&sums_t[a + l][b]);
      transpose16(rows, columns);
      for (int l = 0; l < 16; ++l) _mm512_storeu_si512(&sums[b + l][a], columns[l]);
    }
}

}  // namespace transfuse::cpu
#endif
