// What flaxlm's CPU kernels share (model/int8_matmul.cc, model/f32_matmul.cc): the x86
// check, the run-time choice of instruction set, and an FFI error for bad input.
#ifndef FLAXLM_MODEL_CPU_KERNELS_H_
#define FLAXLM_MODEL_CPU_KERNELS_H_

#include <string>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FLAXLM_X86 1
#endif

namespace flaxlm {

// Variants by number: 0 = best this CPU supports, 1 = portable, 2 = AVX2+FMA, 3 = AVX-512.
inline int BestVariant() {
#ifdef FLAXLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return 3;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
  return 1;
}

// The function of `variant` (0: this CPU's best) among a kernel's AVX-512, AVX2 and
// portable versions (the first two are ignored off x86), or nullptr where the CPU lacks it.
template <typename Fn>
Fn PickVariant(int variant, Fn avx512, Fn avx2, Fn portable) {
  static const int best = BestVariant();
  if (variant == 0) variant = best;
  if (variant > best) return nullptr;  // not supported by this CPU
  switch (variant) {
    case 3: return avx512;
    case 2: return avx2;
    case 1: return portable;
    default: return nullptr;
  }
}

// A finished future carrying an InvalidArgument error, "<kernel>: <message>".
inline xla::ffi::Future Failed(const std::string& kernel, const std::string& message) {
  xla::ffi::Promise promise;
  promise.SetError(xla::ffi::Error::InvalidArgument(kernel + ": " + message));
  return xla::ffi::Future(promise);
}

}  // namespace flaxlm

#endif  // FLAXLM_MODEL_CPU_KERNELS_H_
