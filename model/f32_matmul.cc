// flaxlm's float32 matmul for few rows on XLA:CPU, called through jax.ffi
// (model/f32_kernel.py); built into one library with model/int8_matmul.cc.
//
//   y[M, N] float32 = x[M, K] float32 @ w[K, N] float32    (Einsum's kernels are [in, out])
//
// Batch-1 decode is a chain of matrix-vector products bound by reading the weights. XLA:CPU
// runs each as one dot split over its threads; this kernel hands the weight out in chunks
// to whichever thread asks next (the caller's, and helpers on XLA's intra-op thread pool),
// so a helper that starts late never holds up the result. A chunk is a band of w's rows
// (one contiguous stretch of memory for every projection up to kChunkColumns wide); each
// thread adds its chunks' products into its own [M, N] sum, 8 rows of w at a time (8
// memory streams; y is read and written once per 8 rows), and the thread that finishes
// the last chunk adds the sums into y. Accumulation is float32. The instruction set is
// chosen at run time (AVX-512, AVX2+FMA, or portable C++), as in the int8 kernel.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using flaxlm::BestVariant;
using flaxlm::Failed;
using flaxlm::PickVariant;

constexpr char kName[] = "flaxlm_f32_matmul";  // in error messages

namespace {

struct Problem {
  const float* x;  // [m, k]
  const float* w;  // [k, n]
  int64_t m, k, n;
};

// out[:, c0:c1] += x[:, k0:k1] @ w[k0:k1, c0:c1], out [m, n].
using BandFn = void (*)(const Problem&, float* out, int64_t k0, int64_t k1, int64_t c0,
                        int64_t c1);

// Rows of w per pass: as many memory streams, and out's load and store shared by them.
constexpr int kStreams = 8;

void BandPortable(const Problem& p, float* out, int64_t k0, int64_t k1, int64_t c0,
                  int64_t c1) {
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = p.w + k * p.n;
    for (int64_t m = 0; m < p.m; ++m) {
      const float xk = p.x[m * p.k + k];
      float* o = out + m * p.n;
      for (int64_t c = c0; c < c1; ++c) o[c] += xk * wk[c];
    }
  }
}

#ifdef FLAXLM_X86

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX2 __attribute__((target("avx2,fma")))

// Rows k .. k + kRows of w, columns c0 .. c1, into every row of out: 16 columns a vector,
// the last vector masked.
template <int kRows>
AVX512 void RowsAvx512(const Problem& p, float* out, int64_t k, int64_t c0, int64_t c1) {
  const float* w = p.w + k * p.n;
  for (int64_t c = c0; c < c1; c += 16) {
    const int64_t left = c1 - c;
    const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    __m512 wv[kRows];
    for (int j = 0; j < kRows; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * p.n + c);
    for (int64_t m = 0; m < p.m; ++m) {
      const float* x = p.x + m * p.k + k;
      float* o = out + m * p.n + c;
      __m512 acc = _mm512_maskz_loadu_ps(mask, o);
      for (int j = 0; j < kRows; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[j]), wv[j], acc);
      _mm512_mask_storeu_ps(o, mask, acc);
    }
  }
}

AVX512 void BandAvx512(const Problem& p, float* out, int64_t k0, int64_t k1, int64_t c0,
                       int64_t c1) {
  int64_t k = k0;
  for (; k + kStreams <= k1; k += kStreams) RowsAvx512<kStreams>(p, out, k, c0, c1);
  for (; k < k1; ++k) RowsAvx512<1>(p, out, k, c0, c1);
}

// The same with 8 columns a vector; lanes past c1 of the last vector are masked off
// (kMasked: AVX2's masked loads and stores are slower than plain ones, so only there).
template <int kRows, bool kMasked>
AVX2 void VectorAvx2(const Problem& p, float* out, int64_t k, int64_t c, __m256i mask) {
  const float* w = p.w + k * p.n + c;
  __m256 wv[kRows];
  for (int j = 0; j < kRows; ++j) {
    wv[j] = kMasked ? _mm256_maskload_ps(w + j * p.n, mask) : _mm256_loadu_ps(w + j * p.n);
  }
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.k + k;
    float* o = out + m * p.n + c;
    __m256 acc = kMasked ? _mm256_maskload_ps(o, mask) : _mm256_loadu_ps(o);
    for (int j = 0; j < kRows; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(x[j]), wv[j], acc);
    if (kMasked) _mm256_maskstore_ps(o, mask, acc);
    else _mm256_storeu_ps(o, acc);
  }
}

template <int kRows>
AVX2 void RowsAvx2(const Problem& p, float* out, int64_t k, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) VectorAvx2<kRows, false>(p, out, k, c, __m256i());
  if (c < c1) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(c1 - c)), lane);
    VectorAvx2<kRows, true>(p, out, k, c, mask);
  }
}

AVX2 void BandAvx2(const Problem& p, float* out, int64_t k0, int64_t k1, int64_t c0,
                   int64_t c1) {
  int64_t k = k0;
  for (; k + kStreams <= k1; k += kStreams) RowsAvx2<kStreams>(p, out, k, c0, c1);
  for (; k < k1; ++k) RowsAvx2<1>(p, out, k, c0, c1);
}

#else
constexpr BandFn BandAvx512 = nullptr, BandAvx2 = nullptr;  // x86 only
#endif  // FLAXLM_X86

// Weights per chunk (256 KiB): tens of microseconds of streaming, so two threads share
// even a 576 x 192 projection and a chunk costs little more than its atomic increment.
constexpr int64_t kChunkWeights = 1 << 16;
// Chunks span at most this many columns: a band of rows is then one contiguous stretch of
// memory for every projection up to this wide, and has >= 8 rows (kStreams).
constexpr int64_t kChunkColumns = 8192;

// One FFI call: chunk c is rows [kb * band_rows, ...) x columns [cb * band_cols, ...) of
// w, kb = c / col_blocks and cb = c % col_blocks, so consecutive chunks walk along memory.
struct Call {
  Problem p;
  float* y;
  BandFn band;
  int64_t band_rows = 1, band_cols = 1, col_blocks = 1, chunks = 1;
  std::vector<std::vector<float>> sums;  // [m, n] per thread that takes a chunk
  std::atomic<int64_t> next{0}, finished{0}, workers{0};
  ffi::Promise promise;  // available once y holds the sum of every chunk

  void Reduce() {
    const int64_t size = p.m * p.n;
    std::fill(y, y + size, 0.0f);
    for (const auto& sum : sums) {
      for (int64_t i = 0; i < static_cast<int64_t>(sum.size()); ++i) y[i] += sum[i];
    }
  }

  void Work() {
    int64_t c = next.fetch_add(1, std::memory_order_relaxed);
    if (c >= chunks) return;  // started late: every chunk is taken
    std::vector<float>& sum = sums[workers.fetch_add(1, std::memory_order_relaxed)];
    sum.assign(p.m * p.n, 0.0f);
    for (; c < chunks; c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t kb = c / col_blocks, cb = c % col_blocks;
      band(p, sum.data(), kb * band_rows, std::min(p.k, (kb + 1) * band_rows),
           cb * band_cols, std::min(p.n, (cb + 1) * band_cols));
      if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        Reduce();
        promise.SetAvailable();
      }
    }
  }
};

ffi::Future F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                          int32_t variant, int32_t max_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || wd[0] != xd[1] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return Failed(kName, "shapes must be x [M, K], w [K, N], y [M, N]");
  }
  auto call = std::make_shared<Call>();
  call->band = PickVariant<BandFn>(variant, BandAvx512, BandAvx2, BandPortable);
  if (call->band == nullptr) return Failed(kName, "variant not supported by this CPU");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  call->p = Problem{x.typed_data(), w.typed_data(), m, k, n};
  call->y = y->typed_data();
  ffi::Future done(call->promise);
  if (m == 0 || n == 0 || k == 0) {  // no products: y is zeros
    std::fill(call->y, call->y + m * n, 0.0f);
    call->promise.SetAvailable();
    return done;
  }
  call->band_cols = std::min(n, kChunkColumns);
  call->col_blocks = (n + call->band_cols - 1) / call->band_cols;
  call->band_rows = std::clamp<int64_t>(kChunkWeights / call->band_cols, 1, k);
  call->chunks = call->col_blocks * ((k + call->band_rows - 1) / call->band_rows);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), call->chunks) - 1;
  if (max_threads > 0) helpers = std::min<int64_t>(helpers, max_threads - 1);
  helpers = std::max<int64_t>(helpers, 0);
  call->sums.resize(helpers + 1);
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
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("max_threads"));

// The variant that `variant = 0` runs on this CPU (for the log and the tests).
extern "C" int flaxlm_f32_matmul_best_variant() { return BestVariant(); }
