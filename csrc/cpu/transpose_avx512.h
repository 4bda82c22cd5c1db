// The 16 x 16 transpose of 32-bit elements in AVX-512 registers, which packs weight panels for the
// CPU GEMMs (int8_vnni.cpp, gemm.cpp). Include only where TRANSFUSE_X86_MULTIVERSION is set.
#pragma once

#include <immintrin.h>

namespace transfuse::cpu {

// out[c] = column c of the 16 x 16 matrix rows[0..16) (16 x 16 32-bit elements): 64 shuffles.
__attribute__((target("avx512f"))) inline void transpose16(const __m512i rows[16],
                                                           __m512i out[16]) {
  __m512i t[16], u[16];
  // lane L of t[i]: rows i, i+1 at columns 4L, 4L + 1 (unpacklo), 4L + 2, 4L + 3 (unpackhi)
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane L of u[i + q]: rows i..i+3 at column 4L + q
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // gather lane L of the four row quads: column 4L + q
    const __m512i v0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xee);
    out[q] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    out[4 + q] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    out[8 + q] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    out[12 + q] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

}  // namespace transfuse::cpu
