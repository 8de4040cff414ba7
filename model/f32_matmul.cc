// flaxlm's float32 matmul for few rows on XLA:CPU, called through jax.ffi
// (model/f32_kernel.py). Built into the same library as model/int8_matmul.cc.
//
//   layout 0 ("kn"): y[M, N] = x[M, K] @ w[K, N]     (Einsum's kernels: [in, out])
//   layout 1 ("nk"): y[M, N] = x[M, K] @ w[N, K].T   (the tied head: table [vocab, embed])
//
// Batch-1 decode is a chain of matrix-vector products bound by reading the weights. XLA:CPU
// runs each as one thunk split over its threads; this kernel hands the weight out in small
// chunks to whichever thread asks next, so a late or busy thread never holds up the rest.
// "kn": a chunk is a band of w's rows (one contiguous stretch of memory when it spans all N
// columns); each thread adds its chunks' products into its own [M, N] sum, and the last
// thread to finish adds the sums up. "nk": a chunk is a run of output rows, each a dot
// product over a contiguous row of w. Accumulation is float32. AVX-512 or portable C++ is
// chosen at run time (no -march at build time).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FLAXLM_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;  // [m, k]
  const float* w;  // [k, n] ("kn") or [n, k] ("nk")
  int64_t m, k, n;
};

// "kn": out[m, c0:c1] += x[m, k0:k1] @ w[k0:k1, c0:c1]; out is [m, n].
using BandFn = void (*)(const Problem&, float* out, int64_t k0, int64_t k1, int64_t c0,
                        int64_t c1);
// "nk": y[m, n0:n1] = x[m, :] @ w[n0:n1, :].T; y is [m, n].
using RowsFn = void (*)(const Problem&, float* y, int64_t n0, int64_t n1);

void BandPortable(const Problem& p, float* out, int64_t k0, int64_t k1, int64_t c0,
                  int64_t c1) {
  for (int64_t m = 0; m < p.m; ++m) {
    float* o = out + m * p.n;
    for (int64_t k = k0; k < k1; ++k) {
      const float xk = p.x[m * p.k + k];
      const float* wk = p.w + k * p.n;
      for (int64_t c = c0; c < c1; ++c) o[c] += xk * wk[c];
    }
  }
}

void RowsPortable(const Problem& p, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = p.w + n * p.k;
    for (int64_t m = 0; m < p.m; ++m) {
      const float* xm = p.x + m * p.k;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < p.k; ++i) part[i & 7] += xm[i] * wn[i];
      y[m * p.n + n] = ((part[0] + part[1]) + (part[2] + part[3])) +
                       ((part[4] + part[5]) + (part[6] + part[7]));
    }
  }
}

#ifdef FLAXLM_X86

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

inline AVX512 __mmask16 Mask(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// Rows k..k+kK of w (kK <= 4: as many memory streams) times their columns c0..c1, added
// to every row of `out`: each vector of out is loaded and stored once per kK rows of w.
template <int kK>
AVX512 void AxpyAvx512(const Problem& p, float* out, int64_t k, int64_t c0, int64_t c1) {
  const float* w = p.w + k * p.n;
  for (int64_t c = c0; c < c1; c += 16) {
    const __mmask16 mask = Mask(c1 - c);
    __m512 wv[kK];
    for (int j = 0; j < kK; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * p.n + c);
    for (int64_t m = 0; m < p.m; ++m) {
      const float* x = p.x + m * p.k + k;
      float* o = out + m * p.n + c;
      __m512 acc = _mm512_maskz_loadu_ps(mask, o);
      for (int j = 0; j < kK; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[j]), wv[j], acc);
      _mm512_mask_storeu_ps(o, mask, acc);
    }
  }
}

AVX512 void BandAvx512(const Problem& p, float* out, int64_t k0, int64_t k1, int64_t c0,
                       int64_t c1) {
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) AxpyAvx512<8>(p, out, k, c0, c1);
  for (; k < k1; ++k) AxpyAvx512<1>(p, out, k, c0, c1);
}

// "nk": kW rows of w (as many memory streams) against kRows rows of x, one vector of sums
// per pair; the rest of a row (K % 16) in masked loads.
template <int kRows, int kW>
AVX512 void RowsTileAvx512(const Problem& p, float* y, int64_t m0, int64_t n0) {
  const float* w = p.w + n0 * p.k;
  const float* x = p.x + m0 * p.k;
  __m512 acc[kRows][kW];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kW; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < p.k; i += 16) {
    const __mmask16 mask = Mask(p.k - i);
    __m512 xv[kRows];
    for (int r = 0; r < kRows; ++r) xv[r] = _mm512_maskz_loadu_ps(mask, x + r * p.k + i);
    for (int j = 0; j < kW; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + j * p.k + i);
      for (int r = 0; r < kRows; ++r) acc[r][j] = _mm512_fmadd_ps(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kW; ++j) y[(m0 + r) * p.n + n0 + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

template <int kW>
AVX512 void RowsGroupAvx512(const Problem& p, float* y, int64_t n) {
  for (int64_t m = 0; m < p.m; m += 4) {
    switch (std::min<int64_t>(p.m - m, 4)) {
      case 4: RowsTileAvx512<4, kW>(p, y, m, n); break;
      case 3: RowsTileAvx512<3, kW>(p, y, m, n); break;
      case 2: RowsTileAvx512<2, kW>(p, y, m, n); break;
      default: RowsTileAvx512<1, kW>(p, y, m, n); break;
    }
  }
}

AVX512 void RowsAvx512(const Problem& p, float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) RowsGroupAvx512<4>(p, y, n);
  for (; n < n1; ++n) RowsGroupAvx512<1>(p, y, n);
}

#endif  // FLAXLM_X86

// Variants by number: 0 = best this CPU supports, 1 = portable, 3 = AVX-512 (as the int8
// kernel numbers them; there is no AVX2 code here, so an AVX2 CPU runs the portable code).
int BestVariant() {
#ifdef FLAXLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return 3;
  }
#endif
  return 1;
}

bool Variant(int variant, BandFn* band, RowsFn* rows) {
  static const int best = BestVariant();
  if (variant == 0) variant = best;
  if (variant > best) return false;
  switch (variant) {
#ifdef FLAXLM_X86
    case 3: *band = BandAvx512; *rows = RowsAvx512; return true;
#endif
    case 1: *band = BandPortable; *rows = RowsPortable; return true;
    default: return false;
  }
}

// Weights per chunk: a few microseconds of work, so two threads share even a 576 x 192
// projection, and a chunk costs little more than its atomic increment.
constexpr int64_t kChunkWeights = 1 << 16;
// "kn" chunks span at most this many columns (then a band of w's rows is contiguous for
// every projection up to this width, and a chunk still has a few rows to sum over).
constexpr int64_t kChunkColumns = 8192;

struct Call {
  Problem p;
  float* y;
  int layout;
  BandFn band;
  RowsFn rows;
  int64_t chunks = 1;
  // "kn": chunk c is rows [kb * band_rows, ...) x columns [cb * band_cols, ...) of w,
  // kb = c / col_blocks, cb = c % col_blocks (consecutive chunks walk along memory).
  int64_t band_rows = 1, band_cols = 1, col_blocks = 1;
  int64_t rows_per_chunk = 1;          // "nk"
  std::vector<std::vector<float>> sums;  // "kn": one [m, n] sum per thread that took a chunk
  std::atomic<int64_t> next{0}, finished{0}, workers{0};
  ffi::Promise promise;

  void Chunk(int64_t c, float* sum) const {
    if (layout == 1) {
      rows(p, y, c * rows_per_chunk, std::min(p.n, (c + 1) * rows_per_chunk));
      return;
    }
    const int64_t kb = c / col_blocks, cb = c % col_blocks;
    band(p, sum, kb * band_rows, std::min(p.k, (kb + 1) * band_rows), cb * band_cols,
         std::min(p.n, (cb + 1) * band_cols));
  }

  void Reduce() {
    const int64_t size = p.m * p.n;
    std::memset(y, 0, size * sizeof(float));
    for (const auto& sum : sums) {
      if (sum.empty()) continue;
      for (int64_t i = 0; i < size; ++i) y[i] += sum[i];
    }
  }

  void Work() {
    int64_t c = next.fetch_add(1, std::memory_order_relaxed);
    if (c >= chunks) return;
    float* sum = nullptr;
    if (layout == 0) {
      auto& mine = sums[workers.fetch_add(1, std::memory_order_relaxed)];
      mine.assign(p.m * p.n, 0.0f);
      sum = mine.data();
    }
    for (; c < chunks; c = next.fetch_add(1, std::memory_order_relaxed)) {
      Chunk(c, sum);
      if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        if (layout == 0) Reduce();
        promise.SetAvailable();
      }
    }
  }
};

ffi::Future Failed(std::string message) {
  ffi::Promise promise;
  promise.SetError(ffi::Error::InvalidArgument("flaxlm_f32_matmul: " + message));
  return ffi::Future(promise);
}

ffi::Future F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                          int32_t layout, int32_t variant, int32_t max_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) return Failed("operands must be 2-D");
  if (layout != 0 && layout != 1) return Failed("layout must be 0 (kn) or 1 (nk)");
  const int64_t m = xd[0], k = xd[1], n = layout == 0 ? wd[1] : wd[0];
  if ((layout == 0 ? wd[0] : wd[1]) != k || yd[0] != m || yd[1] != n) {
    return Failed("shapes must be x [M, K], w [K, N] (kn) or [N, K] (nk), y [M, N]");
  }
  auto call = std::make_shared<Call>();
  if (!Variant(variant, &call->band, &call->rows)) return Failed("variant not supported");
  call->p = Problem{x.typed_data(), w.typed_data(), m, k, n};
  call->y = y->typed_data();
  call->layout = layout;
  if (m == 0 || n == 0 || k == 0) {
    std::fill(call->y, call->y + m * n, 0.0f);
    ffi::Future done(call->promise);
    call->promise.SetAvailable();
    return done;
  }
  if (layout == 0) {
    call->band_cols = std::min(n, kChunkColumns);
    call->col_blocks = (n + call->band_cols - 1) / call->band_cols;
    call->band_rows = std::clamp<int64_t>(kChunkWeights / call->band_cols, 1, k);
    call->chunks = call->col_blocks * ((k + call->band_rows - 1) / call->band_rows);
  } else {
    call->rows_per_chunk = std::clamp<int64_t>(kChunkWeights / k, 1, n);
    call->chunks = (n + call->rows_per_chunk - 1) / call->rows_per_chunk;
  }
  int64_t helpers = std::min<int64_t>(pool.num_threads(), call->chunks) - 1;
  if (max_threads > 0) helpers = std::min<int64_t>(helpers, max_threads - 1);
  helpers = std::max<int64_t>(helpers, 0);
  if (layout == 0) call->sums.resize(helpers + 1);
  ffi::Future done(call->promise);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([call] { call->Work(); });
  call->Work();
  return done;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("layout")
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("max_threads"));

extern "C" int flaxlm_f32_matmul_best_variant() { return BestVariant(); }
