// TRANSFUSE_MULTIVERSION compiles a function three times (AVX-512, AVX2, baseline x86-64; GCC
// target_clones) and the loader picks one per CPU. Elsewhere it is empty.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define TRANSFUSE_X86_MULTIVERSION 1
#define TRANSFUSE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TRANSFUSE_MULTIVERSION
#endif
