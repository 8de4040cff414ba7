// flaxlm's int8 matmul for XLA:CPU, called through jax.ffi (model/int8_kernel.py).
//
//   y[..., M, N] float32 = x[..., M, K] float32 @ (q[..., N, K] int8 * scale[..., N, G]).T
//
// Row n of q is split into G groups of K / G inputs: w[n, k] = q[n, k] * scale[n, k / (K / G)].
// G = 1 is per-output-channel (the sum is scaled once, as XLA's dot(x, q) * scale does);
// G > 1 (GGUF Q8_0: K / 32) dequantizes each weight in registers before its product, as
// XLA's dot(x, q * scale) does. Accumulation is float32. Leading dims are vmap's
// "expand_dims" batch dims: each is 1 (broadcast) or the output's.
//
// The weights are read once, as int8, and converted in registers: a batch-1 decode step
// streams 1 byte per weight instead of float32's 4. Output rows are handed out in chunks
// to the calling thread and to helpers on XLA's intra-op thread pool. The instruction set
// is chosen at run time (AVX-512, AVX2+FMA, or portable C++), so the library is built
// without -march and runs on any x86-64 or aarch64.

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

constexpr char kName[] = "flaxlm_int8_matmul";  // in error messages

namespace {

// One 2-D problem: x [m, k] times rows [n0, n1) of q [n, k], scale [n, groups] into y [m, n].
struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t m, k, n, groups;
};

using RowsFn = void (*)(const Problem&, int64_t n0, int64_t n1);

// Portable: 8 partial sums per dot product, which compilers vectorise without fast-math.
void RowsPortable(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t group = p.k / p.groups;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = p.q + n * p.k;
    const float* sn = p.scale + n * p.groups;
    for (int64_t m = 0; m < p.m; ++m) {
      const float* xm = p.x + m * p.k;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t g = 0; g < p.groups; ++g) {
        const float s = p.groups == 1 ? 1.0f : sn[g];
        for (int64_t i = g * group; i < (g + 1) * group; ++i) {
          part[i & 7] += xm[i] * (static_cast<float>(qn[i]) * s);
        }
      }
      float acc = ((part[0] + part[1]) + (part[2] + part[3])) +
                  ((part[4] + part[5]) + (part[6] + part[7]));
      p.y[m * p.n + n] = p.groups == 1 ? acc * sn[0] : acc;
    }
  }
}

#ifdef FLAXLM_X86

// log2 of the group size when groups are a power of two of at least `lanes` weights (so a
// vector of `lanes` weights shares one scale: GGUF Q8_0's 32), else -1. Per-channel: 0.
int GroupShift(const Problem& p, int64_t lanes) {
  if (p.groups == 1) return 0;
  const int64_t group = p.k / p.groups;
  if (group < lanes || (group & (group - 1)) != 0) return -1;
  return __builtin_ctzll(static_cast<unsigned long long>(group));
}

// AVX-512: 16 weights per vector, kVecs vectors per step (kVecs independent FMA chains per
// row of x), up to 4 rows of x per pass over a weight row (the row stays in L1 for the next).
// Grouped: each vector of weights is scaled by its group's scale (index i >> shift).
template <int kRows, bool kGrouped>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void RowAvx512(
    const Problem& p, int64_t m0, int64_t n, int shift) {
  constexpr int kVecs = kRows <= 2 ? 4 : 2;
  const int8_t* qn = p.q + n * p.k;
  const float* sn = p.scale + n * p.groups;
  const float* x = p.x + m0 * p.k;
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 * kVecs <= p.k; i += 16 * kVecs) {
    __m512 w[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      w[v] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qn + i + 16 * v))));
      if (kGrouped) w[v] = _mm512_mul_ps(w[v], _mm512_set1_ps(sn[(i + 16 * v) >> shift]));
    }
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * p.k + i + 16 * v), w[v], acc[r][v]);
      }
    }
  }
  for (int v = 0; i < p.k; i += 16, ++v) {  // the rest (< kVecs vectors): masked loads
    const int64_t left = p.k - i;
    const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, qn + i)));
    if (kGrouped) w = _mm512_mul_ps(w, _mm512_set1_ps(sn[i >> shift]));
    for (int r = 0; r < kRows; ++r) {
      acc[r][v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + r * p.k + i), w, acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 total = acc[r][0];
    for (int v = 1; v < kVecs; ++v) total = _mm512_add_ps(total, acc[r][v]);
    const float sum = _mm512_reduce_add_ps(total);
    p.y[(m0 + r) * p.n + n] = kGrouped ? sum : sum * sn[0];
  }
}

template <bool kGrouped>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void RowsAvx512T(
    const Problem& p, int64_t n0, int64_t n1, int shift) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= p.m; m += 4) RowAvx512<4, kGrouped>(p, m, n, shift);
    switch (p.m - m) {
      case 3: RowAvx512<3, kGrouped>(p, m, n, shift); break;
      case 2: RowAvx512<2, kGrouped>(p, m, n, shift); break;
      case 1: RowAvx512<1, kGrouped>(p, m, n, shift); break;
      default: break;
    }
  }
}

void RowsAvx512(const Problem& p, int64_t n0, int64_t n1) {
  const int shift = GroupShift(p, 16);
  if (p.groups == 1) RowsAvx512T<false>(p, n0, n1, 0);
  else if (shift >= 0) RowsAvx512T<true>(p, n0, n1, shift);
  else RowsPortable(p, n0, n1);  // groups of another size (not GGUF's)
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// AVX2 + FMA: 8 weights per vector, kVecs vectors per step as above (16 registers: fewer
// chains for more rows), a scalar tail (only per-channel rows can have one: grouped rows
// are whole groups of >= 8).
template <int kRows, bool kGrouped>
__attribute__((target("avx2,fma"))) void RowAvx2(const Problem& p, int64_t m0, int64_t n,
                                                 int shift) {
  constexpr int kVecs = kRows <= 2 ? 4 : 2;
  const int8_t* qn = p.q + n * p.k;
  const float* sn = p.scale + n * p.groups;
  const float* x = p.x + m0 * p.k;
  __m256 acc[kRows][kVecs];
  float tail[kRows];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm256_setzero_ps();
    tail[r] = 0.0f;
  }
  int64_t i = 0;
  for (; i + 8 * kVecs <= p.k; i += 8 * kVecs) {
    __m256 w[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      w[v] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qn + i + 8 * v))));
      if (kGrouped) w[v] = _mm256_mul_ps(w[v], _mm256_set1_ps(sn[(i + 8 * v) >> shift]));
    }
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * p.k + i + 8 * v), w[v], acc[r][v]);
      }
    }
  }
  for (int v = 0; i + 8 <= p.k; i += 8, ++v) {
    __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qn + i))));
    if (kGrouped) w = _mm256_mul_ps(w, _mm256_set1_ps(sn[i >> shift]));
    for (int r = 0; r < kRows; ++r) {
      acc[r][v] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * p.k + i), w, acc[r][v]);
    }
  }
  for (; i < p.k; ++i) {
    for (int r = 0; r < kRows; ++r) tail[r] += x[r * p.k + i] * static_cast<float>(qn[i]);
  }
  for (int r = 0; r < kRows; ++r) {
    __m256 total = acc[r][0];
    for (int v = 1; v < kVecs; ++v) total = _mm256_add_ps(total, acc[r][v]);
    const float sum = HorizontalSum(total) + tail[r];
    p.y[(m0 + r) * p.n + n] = kGrouped ? sum : sum * sn[0];
  }
}

template <bool kGrouped>
__attribute__((target("avx2,fma"))) void RowsAvx2T(const Problem& p, int64_t n0, int64_t n1,
                                                   int shift) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= p.m; m += 4) RowAvx2<4, kGrouped>(p, m, n, shift);
    switch (p.m - m) {
      case 3: RowAvx2<3, kGrouped>(p, m, n, shift); break;
      case 2: RowAvx2<2, kGrouped>(p, m, n, shift); break;
      case 1: RowAvx2<1, kGrouped>(p, m, n, shift); break;
      default: break;
    }
  }
}

void RowsAvx2(const Problem& p, int64_t n0, int64_t n1) {
  const int shift = GroupShift(p, 8);
  if (p.groups == 1) RowsAvx2T<false>(p, n0, n1, 0);
  else if (shift >= 0) RowsAvx2T<true>(p, n0, n1, shift);
  else RowsPortable(p, n0, n1);  // groups of another size (not GGUF's)
}

#else
constexpr RowsFn RowsAvx512 = nullptr, RowsAvx2 = nullptr;  // x86 only
#endif  // FLAXLM_X86

// Batch offsets of one operand for every output batch index (vmap's expand_dims layout).
std::vector<int64_t> BatchOffsets(ffi::AnyBuffer::Dimensions dims,
                                  const std::vector<int64_t>& out_batch, int64_t matrix) {
  const size_t rank = out_batch.size();
  int64_t total = 1;
  for (int64_t d : out_batch) total *= d;
  std::vector<int64_t> offsets(total);
  for (int64_t b = 0; b < total; ++b) {
    int64_t rest = b, offset = 0, stride = matrix;
    for (size_t i = rank; i-- > 0;) {
      const int64_t index = rest % out_batch[i];
      rest /= out_batch[i];
      if (dims[i] != 1) offset += index * stride;
      stride *= dims[i];
    }
    offsets[b] = offset;
  }
  return offsets;
}

// One FFI call: its batch offsets, and the output rows handed out in chunks to whichever
// thread asks next (the caller's, and helpers on XLA's pool). A helper that the OS starts
// late finds the chunks taken and leaves, so a busy core never holds up the result.
struct Call {
  std::vector<int64_t> x_off, q_off, s_off;  // per batch element, in elements
  Problem base;                              // pointers of batch element 0
  RowsFn rows;
  int64_t chunk_rows = 1, chunks = 1;
  std::atomic<int64_t> next{0}, finished{0};
  ffi::Promise promise;  // available once every chunk is finished

  void Run(int64_t n0, int64_t n1) const {
    for (size_t b = 0; b < x_off.size(); ++b) {
      Problem p = base;
      p.x += x_off[b];
      p.q += q_off[b];
      p.scale += s_off[b];
      p.y += static_cast<int64_t>(b) * p.m * p.n;
      rows(p, n0, n1);
    }
  }

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      Run(c * chunk_rows, std::min(base.n, (c + 1) * chunk_rows));
      if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) promise.SetAvailable();
    }
  }
};

std::string CheckShapes(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions q,
                        ffi::AnyBuffer::Dimensions s, ffi::AnyBuffer::Dimensions y) {
  const size_t r = x.size();
  if (r < 2 || q.size() != r || s.size() != r || y.size() != r) {
    return "x, q, scale and y must have the same rank >= 2";
  }
  const int64_t k = x[r - 1], n = q[r - 2], groups = s[r - 1];
  if (q[r - 1] != k || s[r - 2] != n || y[r - 2] != x[r - 2] || y[r - 1] != n) {
    return "shapes must be x [M, K], q [N, K], scale [N, G], y [M, N]";
  }
  if (groups < 1 || k % groups != 0) return "scale groups must divide K";
  for (size_t i = 0; i + 2 < r; ++i) {
    for (int64_t d : {x[i], q[i], s[i]}) {
      if (d != 1 && d != y[i]) return "batch dims must be 1 or the output's";
    }
  }
  return "";
}

// Weights per chunk of rows: a few microseconds of work, so two threads share even a
// 576 x 192 projection, and a chunk costs little more than its atomic increment.
constexpr int64_t kChunkWeights = 1 << 15;

ffi::Future Int8MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q,
                           ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y,
                           int32_t variant, int32_t max_threads) {
  if (x.element_type() != ffi::F32 || q.element_type() != ffi::S8 ||
      scale.element_type() != ffi::F32 || y->element_type() != ffi::F32) {
    return Failed(kName, "dtypes must be x float32, q int8, scale float32");
  }
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  const auto yd = y->dimensions();
  if (std::string error = CheckShapes(xd, qd, sd, yd); !error.empty()) {
    return Failed(kName, error);
  }
  const size_t r = xd.size();
  auto call = std::make_shared<Call>();
  call->rows = PickVariant<RowsFn>(variant, RowsAvx512, RowsAvx2, RowsPortable);
  if (call->rows == nullptr) return Failed(kName, "variant not supported by this CPU");
  call->base = Problem{x.typed_data<float>(), q.typed_data<int8_t>(), scale.typed_data<float>(),
                       y->typed_data<float>(), xd[r - 2], xd[r - 1], qd[r - 2], sd[r - 1]};
  const std::vector<int64_t> out_batch(yd.begin(), yd.end() - 2);
  call->x_off = BatchOffsets(xd, out_batch, call->base.m * call->base.k);
  call->q_off = BatchOffsets(qd, out_batch, call->base.n * call->base.k);
  call->s_off = BatchOffsets(sd, out_batch, call->base.n * call->base.groups);

  const int64_t n = call->base.n;
  const int64_t row_weights = std::max<int64_t>(
      call->base.k * static_cast<int64_t>(call->x_off.size()), 1);
  call->chunk_rows = std::clamp<int64_t>(kChunkWeights / row_weights, 1, std::max<int64_t>(n, 1));
  call->chunks = std::max<int64_t>((n + call->chunk_rows - 1) / call->chunk_rows, 1);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), call->chunks) - 1;
  if (max_threads > 0) helpers = std::min<int64_t>(helpers, max_threads - 1);
  ffi::Future done(call->promise);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([call] { call->Work(); });
  call->Work();
  return done;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxlmInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("max_threads"));

// The variant that `variant = 0` runs on this CPU (for the log and the tests).
extern "C" int flaxlm_int8_matmul_best_variant() { return BestVariant(); }
