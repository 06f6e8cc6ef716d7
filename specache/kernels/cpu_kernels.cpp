// CPU kernels for the decode step, where PyTorch's general kernels leave speed on the table:
//  - int8_linear: y = x @ (q * scale)^T. On AMX and AVX512-VNNI CPUs the weights, re-laid once
//    (tile_pack), multiply two int8 limbs of each activation row (int8 x int8, exact int32 sums)
//    on the tile unit or with VPDPBUSD; elsewhere an AVX-512 or AVX2 GEMV streams each int8
//    weight row once for all rows of x (memory speed).
//  - dense_linear: y = x @ w^T for fp32 or bf16 weights (re-laid once: dense_pack), whose outputs
//    do not depend on how many rows x has (PyTorch's GEMMs' do, in the last bit).
//  - paged_attention: attention of every sequence of a step in one call, reading its K/V straight
//    from the flat slot arrays (no gather copy, no per-sequence kernel launch).
//  - FusedDecoder: a whole decode / verification step of the decoder layers in one call.
//  - rms_norm, swiglu: row-wise ops of the op-by-op (prefill) path.
//  - ngram_match: prompt lookup's search for the longest latest match of the text's last tokens.
// Built on first use with -march=native (torch.utils.cpp_extension); AVX-512 / AMX / AVX2 paths
// where the CPU has them, plain loops (auto-vectorised) otherwise.
#include <ATen/Parallel.h>
#include <pybind11/numpy.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPECACHE_AVX512 1
#endif

namespace {

constexpr int64_t kRowTile = 8;  // weight rows per task unit (read once for all rows of x)
constexpr int64_t kMaxXRows = 16;  // activation rows per register tile
constexpr int64_t kMaxGroup = 16;  // query heads per KV head that the attention kernel takes

// A weight row's dot product times its scale (int8 weights), or as it is (scale null: bf16 weights).
inline float scaled(float dot, const float* scale, int r) { return scale == nullptr ? dot : dot * scale[r]; }


#ifdef SPECACHE_AVX512
// 16 floats from fp32 or bf16 (masked lanes read as 0).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Ask for `bytes` of memory (a cached key or value row, a weight tile) ahead of its use: the KV
// cache streams from memory behind the slots' indirection, which hides the pattern from the
// hardware prefetcher, and the weights of a step come from a few streams at once.
inline void prefetch_row(const void* row, int bytes) {
  for (int line = 0; line < bytes; line += 64) _mm_prefetch(static_cast<const char*>(row) + line, _MM_HINT_T0);
}

inline __m512 load_int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 load_int8x16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// 16 weights widened to fp32: int8 (one scale per row, applied after the dot) or bf16 (dense).
inline __m512 load_weights16(const int8_t* p) { return load_int8x16(p); }
inline __m512 load_weights16(const int8_t* p, __mmask16 m) { return load_int8x16(p, m); }
inline __m512 load_weights16(const at::BFloat16* p) { return load16(p, 0xFFFF); }
inline __m512 load_weights16(const at::BFloat16* p, __mmask16 m) { return load16(p, m); }

// out[m][r] = scale[r] * dot(w[r], x[m]) for R weight rows and M activation rows (fp32 activations;
// int8 weights with their row scales, or bf16 weights and no scale). Full 16-wide steps without
// masks; one masked step for a K that is not a multiple of 16.
template <typename W, int R, int M>
inline void dot_tile(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* out,
                     int64_t ldo, const float* scale) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  // The next tile's rows follow this one in memory: prefetch them while this one computes (a row is
  // only a few cache lines, too short for the hardware prefetcher to ramp up on).
  const char* next = reinterpret_cast<const char*>(w + R * ldw);
  constexpr int64_t bytes = sizeof(W);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int p = 0; p < R * 16 * bytes; p += 64) _mm_prefetch(next + i * R * bytes + p, _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_weights16(w + r * ldw + i);
      // x straight from L1 as the FMA's memory operand: R * M accumulators take the registers.
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + i), acc[r][m]);
    }
  }
  if (i < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_weights16(w + r * ldw + i, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * ldo + r] = scaled(_mm512_reduce_add_ps(acc[r][m]), scale, r);
}

// Activation rows as two int8 "limbs" (the AMX and AVX512-VNNI paths multiply int8 by int8 with
// exact int32 sums): each row is split into x ~= s1 * hi + s2 * lo with s1 = max|x| / 127 and
// s2 = s1 / 254, at most max|x| / 64516 off per element (~16 significant bits, finer than bf16
// activations). K must be a multiple of 16.
// sum_hi / sum_lo: each row's limb sums, which the AVX512-VNNI path needs (see vnni_gemm).
struct Limbs {
  std::vector<int8_t> hi, lo;
  std::vector<float> s1, s2;
  std::vector<int32_t> sum_hi, sum_lo;
};

// The limbs of one row of k (a multiple of 16) values.
template <typename In>
void split_row(const In* x, int64_t k, int8_t* hi, int8_t* lo, float* s1, float* s2, int32_t* sum_hi,
               int32_t* sum_lo) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;  // max_ps drops NaNs: track them apart
  for (int64_t j = 0; j < k; j += 16) {
    const __m512 v = load16(x + j, 0xFFFF);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float top = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
  if (!(top > 0.f)) {  // an all-zero row (zero limbs and scales), or one with a NaN (NaN scales)
    std::memset(hi, 0, k), std::memset(lo, 0, k);
    *sum_hi = *sum_lo = 0;
    *s1 = *s2 = top == 0.f ? 0.f : std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *s1 = top / 127.f, *s2 = *s1 / 254.f;
  const __m512 step1 = _mm512_set1_ps(*s1), inv1 = _mm512_set1_ps(1.f / *s1), inv2 = _mm512_set1_ps(1.f / *s2);
  __m512i hi_sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
  for (int64_t j = 0; j < k; j += 16) {
    const __m512 v = load16(x + j, 0xFFFF);
    const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(v, inv1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 rest = _mm512_fnmadd_ps(h, step1, v);  // |rest| <= s1 / 2
    const __m128i h8 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(h));
    const __m128i l8 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(rest, inv2)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + j), h8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + j), l8);
    hi_sum = _mm512_add_epi32(hi_sum, _mm512_cvtepi8_epi32(h8));  // the limbs as stored (saturated)
    lo_sum = _mm512_add_epi32(lo_sum, _mm512_cvtepi8_epi32(l8));
  }
  *sum_hi = _mm512_reduce_add_epi32(hi_sum), *sum_lo = _mm512_reduce_add_epi32(lo_sum);
}

// The limbs of x [M, K], in a per-thread buffer (a fresh multi-MB one per prefill call would
// cost page faults every time).
template <typename In>
const Limbs& split_rows(const In* x, int64_t m, int64_t k) {
  thread_local Limbs buffer;
  Limbs& limbs = buffer;  // a lambda names the running thread's thread_local: pass this one's
  limbs.hi.resize(m * k), limbs.lo.resize(m * k), limbs.s1.resize(m), limbs.s2.resize(m);
  limbs.sum_hi.resize(m), limbs.sum_lo.resize(m);
  at::parallel_for(0, m, 32, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      split_row(x + r * k, k, limbs.hi.data() + r * k, limbs.lo.data() + r * k, &limbs.s1[r], &limbs.s2[r],
                &limbs.sum_hi[r], &limbs.sum_lo[r]);
  });
  return limbs;
}

// The tile layout of int8 weights that the AMX and AVX512-VNNI paths read (tile_pack): blocks of
// 16 outputs x 64 inputs, 1 KB each, a block's tiles consecutive along K; inside a tile, 16 "quads"
// of 64 bytes, quad j holding inputs 4j .. 4j + 3 of each of the 16 outputs.
constexpr int64_t kTileN = 16, kTileK = 64, kTileBytes = kTileN * kTileK;

// 16 fp32 outputs to y, as they are or rounded to bf16 (round to nearest even, as PyTorch).
template <typename Out>
inline void store16(__m512 v, Out* y) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm512_storeu_ps(y, v);
  } else {
#ifdef __AVX512BF16__
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
#else
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    for (int i = 0; i < 16; ++i) y[i] = static_cast<at::BFloat16>(lanes[i]);
#endif
  }
}

// The outputs of 16 int32 limb sums: (s1 * hi + s2 * lo) * scale. Every path and row count
// combines them with these instructions, so a row's output depends on its own sums only.
inline __m512 combine_limbs(__m512i hi, __m512i lo, float s1, float s2, const float* scale) {
  const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(s1),
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(s2)));
  return _mm512_mul_ps(sum, _mm512_loadu_ps(scale));
}

#elif defined(__AVX2__) && defined(__FMA__)
#define SPECACHE_AVX2 1

inline __m256 load_int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 load_weights8(const int8_t* p) { return load_int8x8(p); }
inline __m256 load_weights8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// dot_tile on AVX2 (8 lanes): each weight widened once for all M activation rows, as above. The
// loop the compiler vectorised from the plain version widened every weight once per activation
// row: a 17-row verification step of the hybrid target cost 12.6x a one-row step (AMD EPYC, AVX2).
// Each accumulator sums its own row in a fixed order whatever R and M are, so a row's result does
// not depend on the batch it is in (greedy speculation equals plain decoding bit for bit).
template <typename W, int R, int M>
inline void dot_tile(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* out,
                     int64_t ldo, const float* scale) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + R * ldw);
  constexpr int64_t bytes = sizeof(W);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    if (i * bytes % 64 == 0)
      for (int p = 0; p < R * 64; p += 64) _mm_prefetch(next + i * R * bytes + p, _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load_weights8(w + r * ldw + i);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i), acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float sum = hsum8(acc[r][m]);
      for (int64_t j = i; j < k; ++j) sum += static_cast<float>(w[r * ldw + j]) * x[m * ldx + j];
      out[m * ldo + r] = scaled(sum, scale, r);
    }
}
#else
template <typename W, int R, int M>
inline void dot_tile(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* out,
                     int64_t ldo, const float* scale) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      const W* wr = w + r * ldw;
      const float* xm = x + m * ldx;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(wr[i]) * xm[i];
      out[m * ldo + r] = scaled(acc, scale, r);
    }
}
#endif

// Weight rows per dot_tile for M activation rows: R * M accumulators stay in registers (32 on
// AVX-512, 16 on AVX2, where two more hold a widened weight and an activation).
template <int M>
constexpr int tile_rows() {
#ifdef SPECACHE_AVX2
  return M == 1 ? 8 : M <= 3 ? 4 : M <= 6 ? 2 : 1;
#else
  return M == 1 ? 8 : M <= 4 ? 4 : M <= 8 ? 2 : 1;
#endif
}

// A tile of `rows` weight rows: sub-tiles of R rows (the widening of a weight to fp32 is shared by
// the M activation rows), then single rows.
template <typename W, int M>
void row_tile(const W* w, int64_t k, const float* x, float* y, int64_t n, const float* scale, int64_t r,
              int64_t rows) {
  constexpr int R = tile_rows<M>();
  const float* no_scale = nullptr;
  int64_t i = r;
  for (; i + R <= r + rows; i += R) dot_tile<W, R, M>(w + i * k, k, x, k, k, y + i, n, scale ? scale + i : no_scale);
  for (; i < r + rows; ++i) dot_tile<W, 1, M>(w + i * k, k, x, k, k, y + i, n, scale ? scale + i : no_scale);
}

template <typename W>
using RowTileFn = void (*)(const W*, int64_t, const float*, float*, int64_t, const float*, int64_t, int64_t);

template <typename W, size_t... Ms>
constexpr std::array<RowTileFn<W>, sizeof...(Ms)> row_tiles(std::index_sequence<Ms...>) {
  return {&row_tile<W, static_cast<int>(Ms + 1)>...};
}

#ifdef SPECACHE_AVX2
// Activation rows per pass over a weight tile: 2 weight rows x 6 activation rows keep 12 of AVX2's
// 16 registers accumulating; one weight row against 16 activation rows spilled (a 17-token pass of
// the hybrid target: 61 -> 52 ms).
constexpr int64_t kXRowsPerPass = 6;
#else
constexpr int64_t kXRowsPerPass = kMaxXRows;
#endif

// kRowTiles<W>[M - 1] for the 1 .. kXRowsPerPass activation rows a pass can take
template <typename W>
constexpr auto kRowTiles = row_tiles<W>(std::make_index_sequence<kXRowsPerPass>());

// Rows row_begin .. row_end of y = x @ w^T; the activation rows go in groups of kXRowsPerPass inside
// each weight tile, so a tile is read from memory once and from L1 by the later groups. Each output
// is one accumulator's sum in a fixed order, whatever the number of rows: a row's result does not
// depend on the batch it is in.
template <typename W>
void rows_any(const W* w, int64_t k, const float* x, int64_t m_rows, float* y, int64_t n,
              const float* scale, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; r += kRowTile) {
    const int64_t rows = std::min(kRowTile, row_end - r);
    for (int64_t m = 0; m < m_rows; m += kXRowsPerPass)
      kRowTiles<W>[std::min(kXRowsPerPass, m_rows - m) - 1](w, k, x + m * k, y + m * n, n, scale, r, rows);
  }
}

}  // namespace

// ---- AMX: int8 weights times int8 "limbs" of the activations on the tile unit ----
// Each activation row is split into two int8 limbs, x ~= s1 * hi + s2 * lo with s1 = max|x| / 127
// and s2 = s1 / 254: at most max|x| / 64516 off per element (~16 significant bits, finer than
// bf16 activations). TDPBSSD multiplies both limbs with the int8 weights as stored: no widening
// of the weights to bf16 (which had made a 16-row step cost ~1.5x a one-row step) and exact int32
// sums. Measured here on the 30 layers of SmolLM2-135M's projections, weights streamed from
// memory: 1 row 5.5 -> 2.9 ms, 16 rows 8.0 -> 4.4 ms, against bf16 tiles widened on the fly.
// A row's result depends on its own limbs only, so any batch gives it bit for bit (greedy
// speculative output equals plain output on int8 weights).
// Weights are re-laid once ("packed") as tiles of 16 outputs x 64 inputs in the VNNI order that
// TDPBSSD reads: 1 KB per tile, the tiles of one 16-output block consecutive along K.
#if defined(SPECACHE_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define SPECACHE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

namespace {

// Above this many rows (prefill chunks) work units of up to kLargeRowSpan rows x kLargeColBlocks
// output blocks, whose weights (<= 384 KB) stay in L2 while the unit's 16-row chunks pass over
// them; up to it, units of one block pair over all rows (the two threads split the weights).
constexpr int64_t kAmxLargeRows = 64;
constexpr int64_t kLargeRowSpan = 512, kLargeColBlocks = 16;
constexpr int64_t kWeightPrefetch = 4;  // weight tiles ahead along K (each stream)

// GCC's AMX intrinsics are asm statements without a memory clobber: the compiler does not know
// that a tile load reads the buffer just written (it drops the stores) or that a tile store
// writes one. A compiler barrier around them keeps the memory traffic in order.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_enabled() {
  // Linux hands out the AMX register state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Tiles 0-3: C (block 0 hi, block 0 lo, block 1 hi, block 1 lo), 4-5: A (hi and lo limbs of up to
// 16 rows), 6-7: B (the two weight blocks).
void amx_configure(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(rows), cfg.colsb[t] = 64;
  cfg.rows[6] = cfg.rows[7] = 16, cfg.colsb[6] = cfg.colsb[7] = 64;
  compiler_barrier();
  _tile_loadconfig(&cfg);
}

// Accumulator tile 0-3 to memory (rows `stride_bytes` apart); tile numbers must be immediates,
// hence the switch.
inline void store_tile(int tile, void* dst, int64_t stride_bytes) {
  switch (tile) {
    case 0: _tile_stored(0, dst, stride_bytes); break;
    case 1: _tile_stored(1, dst, stride_bytes); break;
    case 2: _tile_stored(2, dst, stride_bytes); break;
    default: _tile_stored(3, dst, stride_bytes); break;
  }
  compiler_barrier();
}

// y[r0 .. r0 + rows, 16 * block0 .. 16 * (block0 + Blocks)) for rows <= 16 (tiles configured for
// `rows`), over all of K.
template <int Blocks, typename Out>
void amx_block(const int8_t* packed, const float* scale, const Limbs& x, int64_t r0, int64_t rows, int64_t k,
               int64_t n, int64_t block0, Out* y) {
  const int64_t kb_count = k / kTileK;
  const int8_t* w0 = packed + block0 * kb_count * kTileBytes;
  const int8_t* w1 = w0 + kb_count * kTileBytes;
  const int8_t* hi = x.hi.data() + r0 * k;
  const int8_t* lo = x.lo.data() + r0 * k;
  _tile_zero(0);
  _tile_zero(1);
  if (Blocks > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  compiler_barrier();
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    prefetch_row(w0 + (kb + kWeightPrefetch) * kTileBytes, kTileBytes);
    if (Blocks > 1) prefetch_row(w1 + (kb + kWeightPrefetch) * kTileBytes, kTileBytes);
    _tile_loadd(4, hi + kb * kTileK, k);
    _tile_loadd(5, lo + kb * kTileK, k);
    _tile_loadd(6, w0 + kb * kTileBytes, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 5, 6);
    if (Blocks > 1) {
      _tile_loadd(7, w1 + kb * kTileBytes, 64);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  alignas(64) int32_t c_hi[16 * kTileN], c_lo[16 * kTileN];
  for (int b = 0; b < Blocks; ++b) {
    store_tile(2 * b, c_hi, 64);  // block b's hi and lo sums
    store_tile(2 * b + 1, c_lo, 64);
    const int64_t n0 = (block0 + b) * kTileN;
    for (int64_t r = 0; r < rows; ++r)
      store16(combine_limbs(_mm512_load_si512(c_hi + r * kTileN), _mm512_load_si512(c_lo + r * kTileN),
                            x.s1[r0 + r], x.s2[r0 + r], scale + n0),
              y + (r0 + r) * n + n0);
  }
}

// y[M, N] = x[M, K] @ (w * scale)^T on the tile unit, any M; x fp32 or bf16, y fp32 or bf16.
template <typename In, typename Out>
void amx_gemm(const int8_t* packed, const float* scale, const In* x, int64_t m, int64_t k, int64_t n, Out* y) {
  if (m == 0) return;  // (a prefill chunk without logits rows reaches the LM head with none)
  const Limbs& limbs = split_rows(x, m, k);
  const bool large = m > kAmxLargeRows;
  const int64_t blocks = n / kTileN;
  const int64_t row_span = large ? kLargeRowSpan : m, col_span = large ? kLargeColBlocks : 2;
  const int64_t col_units = (blocks + col_span - 1) / col_span;
  const int64_t units = (m + row_span - 1) / row_span * col_units;
  at::parallel_for(0, units, 1, [&](int64_t ub, int64_t ue) {
    int64_t configured = -1;
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t row_begin = u / col_units * row_span, row_end = std::min(m, row_begin + row_span);
      const int64_t block_begin = u % col_units * col_span, block_end = std::min(blocks, block_begin + col_span);
      for (int64_t r0 = row_begin; r0 < row_end; r0 += 16) {
        const int64_t rows = std::min<int64_t>(16, row_end - r0);
        if (rows != configured) amx_configure(configured = rows);
        for (int64_t b = block_begin; b < block_end; b += 2) {
          if (b + 1 < block_end) {
            amx_block<2>(packed, scale, limbs, r0, rows, k, n, b, y);
          } else {
            amx_block<1>(packed, scale, limbs, r0, rows, k, n, b, y);
          }
        }
      }
    }
    _tile_release();
  });
}

}  // namespace
#endif

// ---- AVX512-VNNI: int8 weights times the int8 limbs of the activations (CPUs without AMX) ----
// VPDPBUSD multiplies 64 unsigned by 64 signed bytes into 16 int32 sums. The weights are laid out
// (vnni_pack) as 64-byte "quads": 4 inputs of 16 outputs, so with an activation's 4 limb bytes
// broadcast each lane sums one output: no horizontal reductions (one per output cost more than
// the products when K is 576), and one weight load serves every activation row of a pass. A group
// of up to 4 blocks of 16 outputs interleaves its quads ([K/4][blocks][64 bytes]), so a pass over
// its blocks reads one sequential stream (separate streams per block, 16 * K bytes apart, left a
// one-row decode step 10-30% slower than the fp32 GEMV; so did 8-block groups at 1-4 rows).
// Measured on an AMD EPYC with AVX512-VNNI (2 cores), int8 projections of SmolLM2-135M's 30
// layers against the fp32 GEMV: 1 row 3.2 vs 3.6 ms, 4 rows 4.0 vs 5.5, 8 rows 5.5 vs 9.7, 17 rows
// 10.0 vs 27.7 (README). The weights (signed) are the unsigned operand, stored biased by 128 (the
// sign bit flipped); sum((w + 128) * x) - 128 * sum(x) takes the bias out again, exactly. Integer
// sums are exact in any order and combine_limbs makes the outputs, so a row's result is bit for
// bit the same in any batch (greedy spec == plain).
#if defined(SPECACHE_AVX512) && defined(__AVX512VNNI__)
#define SPECACHE_VNNI 1
namespace {

constexpr int64_t kVnniGroup = 4;  // blocks of 16 outputs per interleaved group (and per task)
constexpr int64_t kVnniRowsPerPass = 4;  // activation rows per pass over a group's weights
// Quad rows to prefetch ahead. Passes of up to 3 rows read whole group rows (4 blocks), which the
// hardware prefetcher follows; from 4 rows a pass covers part of each row and the software
// prefetch alone has to hide the memory's latency behind more work per row: 48 rows ahead ran a
// 6-row step of the 30 layers' projections at 0.65-0.78x the fp32 GEMV's time, 16 ahead 0.80x.
template <int M>
constexpr int64_t vnni_prefetch_rows() {
  return M <= 3 ? 16 : 48;
}

// Blocks per pass for M activation rows (a divisor of kVnniGroup): 2 * B * M int32 accumulators
// and B weights in registers.
template <int M>
constexpr int vnni_blocks() {
  return M <= 3 ? 4 : M <= 4 ? 2 : 1;
}

// acc + VPDPBUSD(u8, s8), accumulated in acc's register. With the intrinsic GCC 12 kept every
// accumulator in two registers, copying it there and back around each instruction (two moves per
// product instruction, some on the stack): 4-5 G instructions/s per core against 7.7 here.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// Rows m0 .. m0 + M of blocks first .. first + B of a group of `width` blocks at `group`, outputs
// from column col0 (the group's first output).
template <int B, int M, typename Out>
inline void vnni_pass(const int8_t* group, int64_t width, int64_t first, const float* scale, const Limbs& x,
                      int64_t m0, int64_t k, int64_t n, int64_t col0, Out* y) {
  __m512i acc_hi[B][M], acc_lo[B][M];
  for (int b = 0; b < B; ++b)
    for (int m = 0; m < M; ++m) acc_hi[b][m] = acc_lo[b][m] = _mm512_setzero_si512();
  const int64_t quads = k / 4, stride = width * 64;  // bytes from one quad of a block to its next
  const int8_t* w = group + first * 64;
  const int32_t* hi = reinterpret_cast<const int32_t*>(x.hi.data() + m0 * k);  // row m's quad j: [m * quads + j]
  const int32_t* lo = reinterpret_cast<const int32_t*>(x.lo.data() + m0 * k);
  // The first pass over a group asks for its whole rows ahead (later passes read them from L2):
  // a pass over some of a group's blocks reads only part of each row, a pattern the hardware
  // prefetcher follows less well.
  const int64_t lines = first == 0 && m0 == 0 ? width : B;
  for (int64_t j = 0; j < quads; ++j, w += stride) {
    const char* ahead = reinterpret_cast<const char*>(w + vnni_prefetch_rows<M>() * stride);
    for (int64_t c = 0; c < lines; ++c) _mm_prefetch(ahead + c * 64, _MM_HINT_T0);
    __m512i wv[B];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(w + b * 64);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i h = _mm512_set1_epi32(hi[m * quads + j]), l = _mm512_set1_epi32(lo[m * quads + j]);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        acc_hi[b][m] = dpbusd(acc_hi[b][m], wv[b], h);
        acc_lo[b][m] = dpbusd(acc_lo[b][m], wv[b], l);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    const int64_t row = m0 + m;
    const __m512i hi_bias = _mm512_set1_epi32(128 * x.sum_hi[row]), lo_bias = _mm512_set1_epi32(128 * x.sum_lo[row]);
    for (int b = 0; b < B; ++b) {
      const int64_t col = col0 + (first + b) * kTileN;
      store16(combine_limbs(_mm512_sub_epi32(acc_hi[b][m], hi_bias), _mm512_sub_epi32(acc_lo[b][m], lo_bias),
                            x.s1[row], x.s2[row], scale + col),
              y + row * n + col);
    }
  }
}

// Every block of a group for activation rows m0 .. m0 + M.
template <int M, typename Out>
void vnni_group_pass(const int8_t* group, int64_t width, const float* scale, const Limbs& x, int64_t m0, int64_t k,
                     int64_t n, int64_t col0, Out* y) {
  constexpr int B = vnni_blocks<M>();
  int64_t b = 0;
  for (; b + B <= width; b += B) vnni_pass<B, M>(group, width, b, scale, x, m0, k, n, col0, y);
  for (; b < width; ++b) vnni_pass<1, M>(group, width, b, scale, x, m0, k, n, col0, y);
}

template <typename Out>
using VnniPassFn = void (*)(const int8_t*, int64_t, const float*, const Limbs&, int64_t, int64_t, int64_t, int64_t,
                            Out*);

template <typename Out, size_t... Ms>
constexpr std::array<VnniPassFn<Out>, sizeof...(Ms)> vnni_passes(std::index_sequence<Ms...>) {
  return {&vnni_group_pass<static_cast<int>(Ms + 1), Out>...};
}

// y[M, N] = x[M, K] @ (w * scale)^T from vnni_pack's layout, any M; x fp32 or bf16, y fp32 or
// bf16. A task is a group (64 outputs, whose weights stay in L2 while the row groups pass).
template <typename In, typename Out>
void vnni_gemm(const int8_t* packed, const float* scale, const In* x, int64_t m, int64_t k, int64_t n, Out* y) {
  if (m == 0) return;
  static constexpr auto passes = vnni_passes<Out>(std::make_index_sequence<kVnniRowsPerPass>());
  const Limbs& limbs = split_rows(x, m, k);
  const int64_t blocks = n / kTileN, groups = (blocks + kVnniGroup - 1) / kVnniGroup;
  at::parallel_for(0, groups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t width = std::min(kVnniGroup, blocks - g * kVnniGroup), col0 = g * kVnniGroup * kTileN;
      const int8_t* group = packed + col0 * k;
      for (int64_t m0 = 0; m0 < m; m0 += kVnniRowsPerPass)
        passes[std::min(kVnniRowsPerPass, m - m0) - 1](group, width, scale, limbs, m0, k, n, col0, y);
    }
  });
}

// q [N, K] (N % 16 == 0, K % 4 == 0) in vnni_gemm's layout: per group of up to 4 blocks of 16
// rows, [K/4 quads][blocks][16 outputs][4 inputs], each byte biased by 128.
torch::Tensor vnni_pack(const torch::Tensor& q) {
  const int64_t n = q.size(0), k = q.size(1);
  std::vector<torch::Tensor> groups;
  for (int64_t row = 0; row < n; row += kVnniGroup * kTileN) {
    const int64_t width = std::min(kVnniGroup, (n - row) / kTileN);
    groups.push_back(q.narrow(0, row, width * kTileN).view({width, kTileN, k / 4, 4}).permute({2, 0, 1, 3})
                         .contiguous().view(-1));
  }
  return torch::cat(groups).bitwise_xor_(-128).view_as(q);
}

}  // namespace
#endif

namespace {

// y = x @ (w * scale)^T for fp32 rows x [M, K] and weights w [N, K] (int8 with row scales, or bf16
// with scale null), the GEMV of rows_any split over the weight rows.
template <typename W>
void weight_gemm(const W* w, const float* scale, const float* x, int64_t m, int64_t k, int64_t n, float* y) {
  // Grain: at least ~64 KB of weights per task, so small layers do not pay for waking a thread.
  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * kRowTile * int64_t(sizeof(W)), 1));
  at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
    rows_any(w, k, x, m, y, n, scale, tb * kRowTile, std::min(n, te * kRowTile));
  });
}

}  // namespace

#if defined(SPECACHE_AMX) || defined(SPECACHE_VNNI)
#define SPECACHE_TILED 1
#endif

namespace {
// Whether the tile layout goes to AMX (else, where it exists, to AVX512-VNNI).
bool tiles_on_amx() {
#ifdef SPECACHE_AMX
  return amx_enabled();
#else
  return false;
#endif
}
}  // namespace

// q [N, K] in the tile layout (an int8 tensor of the same size) where the AMX or AVX512-VNNI path
// reads it, or an empty tensor where neither is available or the shape does not tile (N % 16,
// K % 64). For VNNI the bytes are stored biased by 128 (see vnni_gemm).
torch::Tensor tile_pack(const torch::Tensor& q) {
#ifdef SPECACHE_TILED
  const int64_t n = q.size(0), k = q.size(1);
  if (n % kTileN == 0 && k % kTileK == 0) {
    if (tiles_on_amx()) {
      // [N/16, 16, K/64, 16 quads, 4] -> [N/16, K/64, 16 quads, 16 outputs, 4]
      return q.contiguous().view({n / kTileN, kTileN, k / kTileK, kTileK / 4, 4}).permute({0, 2, 3, 1, 4}).contiguous();
    }
#ifdef SPECACHE_VNNI
    return vnni_pack(q.contiguous());
#endif
  }
#endif
  return torch::empty({0}, q.options());
}

#ifdef SPECACHE_TILED
// y = x @ (q * scale)^T from the tile layout, on AMX or VNNI as tile_pack laid it out.
template <typename In, typename Out>
void tiled_gemm(const int8_t* packed, const float* scale, const In* x, int64_t m, int64_t k, int64_t n, Out* y) {
#ifdef SPECACHE_AMX
  if (tiles_on_amx()) return amx_gemm(packed, scale, x, m, k, n, y);
#endif
#ifdef SPECACHE_VNNI
  vnni_gemm(packed, scale, x, m, k, n, y);
#endif
}
#endif

// y = x @ (q * scale)^T for fp32 rows; with a packed copy (tile_pack), on AMX or VNNI.
void quant_gemm(const int8_t* q, const int8_t* packed, const float* scale, const float* x, int64_t m, int64_t k,
                int64_t n, float* y) {
#ifdef SPECACHE_TILED
  // Every row count from the tile layout, one row included (also the fastest single-stream path):
  // each row goes through the same instructions whatever its batch, so verifying K drafts in one
  // step gives bit-for-bit the logits of decoding them one at a time.
  if (packed != nullptr) return tiled_gemm(packed, scale, x, m, k, n, y);
#endif
  weight_gemm(q, scale, x, m, k, n, y);
}

// x [M, K] (fp32 or bf16), q [N, K] int8, scale [N] fp32 -> [M, N] in x's dtype.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const std::optional<torch::Tensor>& packed) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: shapes ", x.sizes(), " ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scale.scalar_type() == torch::kFloat, "int8_linear: dtypes");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous(), "int8_linear: q and scale must be contiguous");
  const bool tiled = packed.has_value() && packed->numel() == q.numel();
#ifdef SPECACHE_TILED
  if (tiled && x.scalar_type() == torch::kBFloat16) {  // bf16 in and out, no fp32 copies
    const auto xc = x.contiguous();
    auto y = torch::empty({x.size(0), q.size(0)}, x.options());
    tiled_gemm(packed->data_ptr<int8_t>(), scale.data_ptr<float>(), xc.data_ptr<at::BFloat16>(), x.size(0), x.size(1),
               q.size(0), y.data_ptr<at::BFloat16>());
    return y;
  }
#endif
  const auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), q.size(0)}, xf.options());
  quant_gemm(q.data_ptr<int8_t>(), tiled ? packed->data_ptr<int8_t>() : nullptr, scale.data_ptr<float>(),
             xf.data_ptr<float>(), xf.size(0), xf.size(1), q.size(0), y.data_ptr<float>());
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

#ifdef SPECACHE_AVX512
#define SPECACHE_PACKED_DENSE 1
namespace {
// Dense weights [N, K] re-laid so that a vector's 16 lanes are 16 outputs (dense_pack): blocks of
// 16 outputs, a block's K * 16 values consecutive; inside a block, for each step along the inputs
// (one fp32 input, or a bf16 input pair 2j, 2j + 1), 64 bytes holding it for each of the 16
// outputs. One instruction (VFMADD231PS, VDPBF16PS) then adds a step's products to 16 outputs'
// fp32 sums, and no horizontal reduction is left at the end.
constexpr int64_t kDenseBlock = 16;
constexpr int kDenseXRows = 8;  // activation rows per pass over a group of weight blocks

struct Fp32Weights {
  using Weight = float;
  using Step = float;  // what a row of x brings to one step, broadcast to every lane
  static constexpr int64_t kInputs = 1;
  static __m512 madd(__m512 acc, __m512i w, Step x) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(w), _mm512_set1_ps(x), acc);
  }
};

#ifdef __AVX512BF16__
struct Bf16Weights {
  using Weight = at::BFloat16;
  using Step = int32_t;  // a pair of bf16 inputs
  static constexpr int64_t kInputs = 2;
  static __m512 madd(__m512 acc, __m512i w, Step x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(x));
  }
};
#endif

// Blocks per tile for M activation rows: RB * M accumulators + RB weight vectors + a broadcast
// fit the 32 registers.
template <int M>
constexpr int dense_blocks() { return M <= 2 ? 8 : M <= 3 ? 6 : M <= 6 ? 4 : 3; }

// y[m][16 b + o] = dot(x[m], w[16 b + o]) for RB blocks and M rows of x. Each output is one fp32
// lane that adds its steps' products in input order: the same sums whatever RB and M are.
template <typename F, typename Out, int RB, int M>
inline void dense_tile(const typename F::Weight* w, int64_t steps, const typename F::Step* x, int64_t ldx, Out* y,
                       int64_t ldy) {
  __m512 acc[RB][M];
  for (int b = 0; b < RB; ++b)
    for (int m = 0; m < M; ++m) acc[b][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    __m512i wv[RB];
    for (int b = 0; b < RB; ++b) wv[b] = _mm512_loadu_si512(w + (b * steps + j) * F::kInputs * kDenseBlock);
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < RB; ++b) acc[b][m] = F::madd(acc[b][m], wv[b], x[m * ldx + j]);
  }
  for (int b = 0; b < RB; ++b)
    for (int m = 0; m < M; ++m) store16(acc[b][m], y + m * ldy + b * kDenseBlock);
}

// Blocks block_begin .. block_end for M rows: tiles of dense_blocks<M>() blocks, then single blocks.
template <typename F, typename Out, int M>
void dense_block_rows(const typename F::Weight* w, int64_t steps, const typename F::Step* x, int64_t ldx, Out* y,
                      int64_t ldy, int64_t block_begin, int64_t block_end) {
  constexpr int RB = dense_blocks<M>();
  const int64_t block_size = steps * F::kInputs * kDenseBlock;
  int64_t b = block_begin;
  for (; b + RB <= block_end; b += RB)
    dense_tile<F, Out, RB, M>(w + b * block_size, steps, x, ldx, y + b * kDenseBlock, ldy);
  for (; b < block_end; ++b) dense_tile<F, Out, 1, M>(w + b * block_size, steps, x, ldx, y + b * kDenseBlock, ldy);
}

template <typename F, typename Out>
using DenseRowsFn = void (*)(const typename F::Weight*, int64_t, const typename F::Step*, int64_t, Out*, int64_t,
                             int64_t, int64_t);

template <typename F, typename Out, size_t... Ms>
constexpr std::array<DenseRowsFn<F, Out>, sizeof...(Ms)> dense_row_fns(std::index_sequence<Ms...>) {
  return {&dense_block_rows<F, Out, static_cast<int>(Ms + 1)>...};
}

// y [M, N] = x [M, K] @ w^T from the packed weights (x as F's steps).
template <typename F, typename Out>
void dense_gemm(const typename F::Weight* packed, const typename F::Step* x, int64_t m, int64_t k, int64_t n,
                Out* y) {
  static constexpr auto fns = dense_row_fns<F, Out>(std::make_index_sequence<kDenseXRows>());
  const int64_t steps = k / F::kInputs, blocks = n / kDenseBlock;
  // Tasks of ~64 KB of weights or more; within a task, groups of 8 blocks (128 outputs) that every
  // row of x goes through, kDenseXRows at a time, while they are in cache.
  const int64_t block_bytes = k * kDenseBlock * static_cast<int64_t>(sizeof(typename F::Weight));
  const int64_t grain = std::max<int64_t>(1, 65536 / block_bytes);
  at::parallel_for(0, blocks, grain, [&](int64_t bb, int64_t be) {
    for (int64_t g = bb; g < be; g += 8) {
      const int64_t ge = std::min(be, g + 8);
      for (int64_t r = 0; r < m; r += kDenseXRows) {
        const int64_t rows = std::min<int64_t>(kDenseXRows, m - r);
        fns[rows - 1](packed, steps, x + r * steps, steps, y + r * n, n, g, ge);
      }
    }
  });
}

template <typename F>
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.size(0) % kDenseBlock == 0 && w.size(1) % F::kInputs == 0,
              "dense_linear: packed weights of shape ", w.sizes(), " are not dense_pack's layout");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0) return y;
  const auto xs = x.to(c10::CppTypeToScalarType<typename F::Weight>::value).contiguous();
  const auto* steps = reinterpret_cast<const typename F::Step*>(xs.template data_ptr<typename F::Weight>());
  const auto* pw = w.data_ptr<typename F::Weight>();
  if (x.scalar_type() == torch::kFloat)
    dense_gemm<F>(pw, steps, x.size(0), x.size(1), w.size(0), y.data_ptr<float>());
  else
    dense_gemm<F>(pw, steps, x.size(0), x.size(1), w.size(0), y.data_ptr<at::BFloat16>());
  return y;
}
}  // namespace
#endif

// w [N, K] (fp32, or bf16 on AVX512-BF16 CPUs) in the layout of dense_gemm (N % 16 == 0, and K even
// for bf16), else an empty tensor.
torch::Tensor dense_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16),
              "dense_pack: w must be 2-D fp32 or bf16");
#ifdef SPECACHE_PACKED_DENSE
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t inputs = w.scalar_type() == torch::kFloat ? 1 : 2;
#ifndef __AVX512BF16__
  if (inputs == 2) return torch::empty({0}, w.options());
#endif
  if (n % kDenseBlock == 0 && k % inputs == 0) {
    // [N / 16, 16, K / s, s] -> [N / 16, K / s, 16, s] for s inputs per step
    return w.contiguous().view({n / kDenseBlock, kDenseBlock, k / inputs, inputs}).permute({0, 2, 1, 3})
        .contiguous().view({n, k});
  }
#endif
  return torch::empty({0}, w.options());
}

// x [M, K] (fp32 or bf16), w [N, K] (fp32 or bf16) -> [M, N] in x's dtype: every output one fp32 sum
// in a fixed order, whatever M is. PyTorch's GEMMs pick their blocking by M, and a row's outputs
// could then differ in the last bit between a one-row decode step and a multi-row verification
// step (greedy prompt lookup left plain decoding's text at a near-tie on SmolLM2 in bf16).
// packed: w is in dense_pack's layout (x is rounded to bf16 for bf16 weights: VDPBF16PS multiplies
// bf16 pairs); else w is row-major bf16 and the fp32 GEMV of the int8 path reads it.
torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& w, bool packed) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_linear: shapes ", x.sizes(), " ",
              w.sizes());
  TORCH_CHECK(w.is_contiguous() && (w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16),
              "dense_linear: w must be contiguous fp32 or bf16");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "dense_linear: x must be fp32 or bf16");
  if (packed) {
#ifdef SPECACHE_PACKED_DENSE
    if (w.scalar_type() == torch::kFloat) return packed_linear<Fp32Weights>(x, w);
#ifdef __AVX512BF16__
    return packed_linear<Bf16Weights>(x, w);
#endif
#endif
    TORCH_CHECK(false, "dense_linear: these packed weights need a build this CPU has not (dense_pack returns none)");
  }
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "dense_linear: unpacked weights must be bf16");
  const auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), w.size(0)}, xf.options());
  weight_gemm(w.data_ptr<at::BFloat16>(), nullptr, xf.data_ptr<float>(), xf.size(0), xf.size(1), w.size(0),
              y.data_ptr<float>());
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

namespace {

// A register-resident attention specialisation (type-erased over the cache dtype), or null.
using AttendFn = void (*)(const float*, const void*, const void*, const int64_t*, int64_t, int64_t, float, float*,
                          float*);

#ifdef SPECACHE_AVX512

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + f, e^f by its degree-6 Taylor
// polynomial (|f| <= ln2 / 2: relative error ~1e-7), times 2^n with vscalefps.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-06f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The largest of row[0 .. n), n >= 1.
inline float row_max(const float* row, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    vmax = _mm512_mask_max_ps(vmax, tail_mask(n - j), vmax, _mm512_maskz_loadu_ps(tail_mask(n - j), row + j));
  return _mm512_reduce_max_ps(vmax);
}

// scores[j] <- exp(scores[j] - max), returns the sum (the softmax denominator).
inline float exp_and_sum(float* scores, int64_t n) {
  const __m512 mx = _mm512_set1_ps(row_max(scores, n));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), mx));
    _mm512_mask_storeu_ps(scores + j, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// The heads of one GQA group share each key and value: load (and widen) it once for all of them.
template <typename T>
inline void group_scores(const float* q, int64_t heads, const T* key, int64_t d, float scale, float* scores,
                         int64_t stride) {
  __m512 acc[kMaxGroup];
  for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    const __m512 kv = load16(key + i, m);
    for (int64_t h = 0; h < heads; ++h) acc[h] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + h * d + i), kv, acc[h]);
  }
  for (int64_t h = 0; h < heads; ++h) scores[h * stride] = _mm512_reduce_add_ps(acc[h]) * scale;
}

template <typename T>
inline void group_accumulate(const float* probs, int64_t heads, int64_t stride, const T* value, float* out,
                             int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    const __m512 vv = load16(value + i, m);
    for (int64_t h = 0; h < heads; ++h) {
      float* o = out + h * d + i;
      _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(_mm512_set1_ps(probs[h * stride]), vv, _mm512_maskz_loadu_ps(m, o)));
    }
  }
}

// attend_group for G heads of 16 * C dims: the queries (scale folded in) and the G x C output
// accumulators live in registers; each key and value is widened once for the whole group.
template <typename T, int G, int C>
void attend_group_fixed(const float* q, const T* k_base, const T* v_base, const int64_t* slots, int64_t visible,
                        int64_t slot_stride, float scale, float* scores, float* out) {
  __m512 qv[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = _mm512_mul_ps(_mm512_loadu_ps(q + (h * C + c) * 16), _mm512_set1_ps(scale));
  constexpr int kRowBytes = 16 * C * static_cast<int>(sizeof(T));
  for (int64_t j = 0; j < visible; ++j) {
    const T* key = k_base + slots[j] * slot_stride;
    if (j + 16 < visible) prefetch_row(k_base + slots[j + 16] * slot_stride, kRowBytes);
    __m512 kc[C];
    for (int c = 0; c < C; ++c) kc[c] = load16(key + c * 16, 0xFFFF);
    for (int h = 0; h < G; ++h) {
      __m512 acc = _mm512_mul_ps(qv[h][0], kc[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[h][c], kc[c], acc);
      scores[h * visible + j] = _mm512_reduce_add_ps(acc);
    }
  }
  float inv_total[G];
  for (int h = 0; h < G; ++h) inv_total[h] = 1.f / exp_and_sum(scores + h * visible, visible);
  __m512 acc[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < visible; ++j) {
    const T* value = v_base + slots[j] * slot_stride;
    if (j + 16 < visible) prefetch_row(v_base + slots[j + 16] * slot_stride, kRowBytes);
    __m512 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(value + c * 16, 0xFFFF);
    for (int h = 0; h < G; ++h) {
      const __m512 p = _mm512_set1_ps(scores[h * visible + j]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(p, vc[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + (h * C + c) * 16, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv_total[h])));
}

template <typename T, int G, int C>
void attend_erased(const float* q, const void* k, const void* v, const int64_t* slots, int64_t visible,
                   int64_t stride, float scale, float* scores, float* out) {
  attend_group_fixed<T, G, C>(q, static_cast<const T*>(k), static_cast<const T*>(v), slots, visible, stride, scale,
                              scores, out);
}

#ifdef __AVX512BF16__
#define SPECACHE_AVX512BF16 1
// s[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once (~45 shuffles and adds instead of 16
// horizontal reductions of ~8 dependent steps each).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Sum the four 128-bit lanes of each u[i] into lane i of the result.
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// attend_group for a bf16 cache with AVX512-BF16 dot products (bf16 pairs, fp32 accumulation),
// G heads of 32 * C dims. Scores: the queries (scale folded in, rounded to bf16) against 16 keys at
// a time, reduced together by reduce16. Softmax in fp32; the probabilities are rounded to bf16 in
// place over their fp32 row (a bf16 row of n + 1 fits in the first half of an fp32 row of n) and
// the denominator sums the rounded values, so the weights still sum to one. Values: each pair of
// keys interleaved dimension by dimension, so one dot-product instruction adds both keys' terms.
template <int G, int C>
void attend_group_bf16(const float* q, const void* k_raw, const void* v_raw, const int64_t* slots, int64_t visible,
                       int64_t slot_stride, float scale, float* scores, float* out) {
  const auto* k_base = static_cast<const uint16_t*>(k_raw);
  const auto* v_base = static_cast<const uint16_t*>(v_raw);
  constexpr int D = 32 * C;
  __m512bh qb[G][C];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c)
      qb[h][c] = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + h * D + c * 32 + 16), vscale),
                                     _mm512_mul_ps(_mm512_loadu_ps(q + h * D + c * 32), vscale));
  for (int64_t j0 = 0; j0 < visible; j0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, visible - j0));
    const uint16_t* keys[16];
    for (int i = 0; i < 16; ++i) keys[i] = k_base + slots[j0 + std::min(i, n - 1)] * slot_stride;
    for (int64_t i = j0 + 32; i < std::min(j0 + 48, visible); ++i)  // the keys two blocks ahead
      prefetch_row(k_base + slots[i] * slot_stride, 64 * C);
    for (int h = 0; h < G; ++h) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[h][0], load_bh(keys[i]));
        for (int c = 1; c < C; ++c) acc[i] = _mm512_dpbf16_ps(acc[i], qb[h][c], load_bh(keys[i] + 32 * c));
      }
      _mm512_mask_storeu_ps(scores + h * visible + j0, tail_mask(n), reduce16(acc));
    }
  }
  float inv_total[G];
  for (int h = 0; h < G; ++h) {
    float* row = scores + h * visible;
    const __m512 mx = _mm512_set1_ps(row_max(row, visible));
    auto* probs = reinterpret_cast<uint16_t*>(row);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < visible; j += 16) {  // reads bytes 4j.., writes 2j..: never ahead of the reads
      const __mmask16 m = tail_mask(visible - j);
      const __m256i rounded =
          (__m256i)_mm512_cvtneps_pbh(exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx)));
      total = _mm512_mask_add_ps(total, m, total,
                                 _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
      _mm256_mask_storeu_epi16(probs + j, m, rounded);
    }
    if (visible % 2) probs[visible] = 0;  // the odd key's partner weighs nothing
    inv_total[h] = 1.f / _mm512_reduce_add_ps(total);
  }
  const __m512i lo_pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                            37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_pairs = _mm512_add_epi16(lo_pairs, _mm512_set1_epi16(16));
  __m512 acc[G][2 * C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < 2 * C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < visible; j += 2) {
    const uint16_t* v0 = v_base + slots[j] * slot_stride;
    const uint16_t* v1 = j + 1 < visible ? v_base + slots[j + 1] * slot_stride : nullptr;
    for (int64_t i = j + 16; i < std::min(j + 18, visible); ++i) prefetch_row(v_base + slots[i] * slot_stride, 64 * C);
    __m512bh pairs[2 * C];  // [V[j][d], V[j+1][d]] for d in 16-dimension runs
    for (int c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
      const __m512i b = v1 != nullptr ? _mm512_loadu_si512(v1 + 32 * c) : _mm512_setzero_si512();
      pairs[2 * c] = (__m512bh)_mm512_permutex2var_epi16(a, lo_pairs, b);
      pairs[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, hi_pairs, b);
    }
    for (int h = 0; h < G; ++h) {
      int32_t pair;
      std::memcpy(&pair, reinterpret_cast<const uint16_t*>(scores + h * visible) + j, sizeof(pair));
      const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 2 * C; ++c) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], p, pairs[c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < 2 * C; ++c)
      _mm512_storeu_ps(out + h * D + c * 16, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv_total[h])));
}
#endif

// The register-resident version for 1-8 heads per KV head and head_dim 64 or 128; null otherwise.
template <typename T>
AttendFn fixed_attention(int64_t heads, int64_t d) {
#ifdef SPECACHE_AVX512BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    static constexpr AttendFn bf16_d64[8] = {&attend_group_bf16<1, 2>, &attend_group_bf16<2, 2>,
                                             &attend_group_bf16<3, 2>, &attend_group_bf16<4, 2>,
                                             &attend_group_bf16<5, 2>, &attend_group_bf16<6, 2>,
                                             &attend_group_bf16<7, 2>, &attend_group_bf16<8, 2>};
    static constexpr AttendFn bf16_d128[4] = {&attend_group_bf16<1, 4>, &attend_group_bf16<2, 4>,
                                              &attend_group_bf16<3, 4>, &attend_group_bf16<4, 4>};
    if (d == 64 && heads >= 1 && heads <= 8) return bf16_d64[heads - 1];
    if (d == 128 && heads >= 1 && heads <= 4) return bf16_d128[heads - 1];
  }
#endif
  static constexpr AttendFn by_d64[8] = {&attend_erased<T, 1, 4>, &attend_erased<T, 2, 4>, &attend_erased<T, 3, 4>,
                                         &attend_erased<T, 4, 4>, &attend_erased<T, 5, 4>, &attend_erased<T, 6, 4>,
                                         &attend_erased<T, 7, 4>, &attend_erased<T, 8, 4>};
  static constexpr AttendFn by_d128[4] = {&attend_erased<T, 1, 8>, &attend_erased<T, 2, 8>, &attend_erased<T, 3, 8>,
                                          &attend_erased<T, 4, 8>};
  if (d == 64 && heads >= 1 && heads <= 8) return by_d64[heads - 1];
  if (d == 128 && heads >= 1 && heads <= 4) return by_d128[heads - 1];
  return nullptr;
}
#else
template <typename T>
AttendFn fixed_attention(int64_t, int64_t) { return nullptr; }

inline float exp_and_sum(float* scores, int64_t n) {
  const float mx = *std::max_element(scores, scores + n);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) total += (scores[j] = std::exp(scores[j] - mx));
  return total;
}

template <typename T>
inline void group_scores(const float* q, int64_t heads, const T* key, int64_t d, float scale, float* scores,
                         int64_t stride) {
  for (int64_t h = 0; h < heads; ++h) {
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc += q[h * d + i] * static_cast<float>(key[i]);
    scores[h * stride] = acc * scale;
  }
}

template <typename T>
inline void group_accumulate(const float* probs, int64_t heads, int64_t stride, const T* value, float* out,
                             int64_t d) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] += probs[h * stride] * static_cast<float>(value[i]);
}
#endif

// One token's query heads of one GQA group (`heads` rows of d at q) against its visible keys:
// out = softmax(scale * q K^T) V, scores being scratch of heads * visible floats.
template <typename T>
void attend_group(const float* q, int64_t heads, const T* k_base, const T* v_base, const int64_t* slots,
                  int64_t visible, int64_t slot_stride, float scale, float* scores, float* out, int64_t d) {
  if (const auto fixed = fixed_attention<T>(heads, d))
    return fixed(q, k_base, v_base, slots, visible, slot_stride, scale, scores, out);
  for (int64_t j = 0; j < visible; ++j)
    group_scores(q, heads, k_base + slots[j] * slot_stride, d, scale, scores + j, visible);
  float inv_total[kMaxGroup];
  for (int64_t h = 0; h < heads; ++h) inv_total[h] = 1.f / exp_and_sum(scores + h * visible, visible);
  std::fill(out, out + heads * d, 0.f);
  for (int64_t j = 0; j < visible; ++j)
    group_accumulate(scores + j, heads, visible, v_base + slots[j] * slot_stride, out, d);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] *= inv_total[h];
}

// New tokens of a sequence from which its attention runs on the tile unit (below). From 32: a
// verification step (at most 16 drafts + 1) stays on the row kernel, so its rows round exactly as
// plain decode rows do.
constexpr int64_t kAmxAttentionMinRows = 32;

#ifdef SPECACHE_AMX
// ---- prefill-sized attention on the tile unit (bf16 cache) ----
// A sequence bringing at least kAmxAttentionMinRows new tokens (a prefill chunk) is attended per
// query head in blocks of 16 queries: S = Q K^T on the tile unit (q scaled, rounded to bf16; fp32
// sums), an exact softmax over each row's visible keys (P rounded to bf16 in place, the
// denominator summing the rounded values, as the one-row kernel does), O = P V on the tile unit.
// The row-at-a-time kernel recomputes nothing either, but at ~7 us per query row and layer (300
// keys) it lost to SDPA's blocked kernel above 64 rows.

// All eight tiles as 16 rows x 64 bytes: S / O accumulators 0-3, A (Q or P) 4, B (K^T or V) 6.
void amx_configure_attention() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  compiler_barrier();
  _tile_loadconfig(&cfg);
}

// Tile numbers must be immediates, hence the switches.
inline void tile_zero_acc(int c) {
  switch (c) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
  }
}

inline void tile_dp_acc(int c) {  // accumulator c += tile 4 x tile 6
  switch (c) {
    case 0: _tile_dpbf16ps(0, 4, 6); break;
    case 1: _tile_dpbf16ps(1, 4, 6); break;
    case 2: _tile_dpbf16ps(2, 4, 6); break;
    default: _tile_dpbf16ps(3, 4, 6); break;
  }
}

// One KV head's keys as K^T tiles: tile (j, c) = keys 16j .. 16j + 15 x dims 32c .. 32c + 31, as 16
// rows of dim pairs x 16 keys (TDPBF16PS's B layout); keys past kv_len are zero.
void layout_keys(const uint16_t* k, const int64_t* slots, int64_t kv_len, int64_t stride, int64_t d, uint32_t* kt) {
  const int64_t blocks = (kv_len + 15) / 16, chunks = d / 32;
  for (int64_t j = 0; j < blocks; ++j)
    for (int64_t n = 0; n < 16; ++n) {
      const int64_t key = j * 16 + n;
      const auto* row = key < kv_len ? reinterpret_cast<const uint32_t*>(k + slots[key] * stride) : nullptr;
      for (int64_t c = 0; c < chunks; ++c) {
        uint32_t* tile = kt + (j * chunks + c) * 256;
        for (int64_t r = 0; r < 16; ++r) tile[r * 16 + n] = row != nullptr ? row[c * 16 + r] : 0u;
      }
    }
}

// One KV head's values: tile (jb, c) = keys 32jb .. 32jb + 31 x dims 16c .. 16c + 15, as 16 rows of
// key pairs x 16 dims holding (V[2r][n], V[2r + 1][n]); keys past kv_len are zero.
void layout_values(const uint16_t* v, const int64_t* slots, int64_t kv_len, int64_t stride, int64_t d, uint16_t* vt) {
  const int64_t pair_blocks = (kv_len + 31) / 32, chunks = d / 16;
  for (int64_t jb = 0; jb < pair_blocks; ++jb)
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t key = jb * 32 + 2 * r + e;
        const uint16_t* row = key < kv_len ? v + slots[key] * stride : nullptr;
        for (int64_t c = 0; c < chunks; ++c) {
          uint16_t* tile = vt + (jb * chunks + c) * 512;
          for (int64_t n = 0; n < 16; ++n) tile[r * 32 + n * 2 + e] = row != nullptr ? row[c * 16 + n] : 0;
        }
      }
}

struct AttentionScratch {
  std::vector<uint16_t> q, probs;
  std::vector<float> scores;
};

// Softmax of one row's first `visible` scores into bf16 probabilities over `cols` columns (zero past
// `visible`), in place over the fp32 row; returns 1 / (sum of the rounded probabilities).
float softmax_row_bf16(float* row, int64_t visible, int64_t cols, uint16_t* probs) {
  const __m512 mx = _mm512_set1_ps(row_max(row, visible));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = j < visible ? tail_mask(visible - j) : 0;
    const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx)));
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(e);
    total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), rounded);
  }
  return 1.f / _mm512_reduce_add_ps(total);
}

// One query head of one sequence: q rows at q + i * q_stride, output rows at out + i * out_stride;
// kt / vt its KV head's tiles. d a multiple of 32.
void amx_attend_head(const float* q, int64_t q_stride, const uint32_t* kt, const uint16_t* vt, int64_t q_len,
                     int64_t kv_len, int64_t d, float scale, float* out, int64_t out_stride, AttentionScratch& s) {
  const int64_t chunks = d / 32, vchunks = d / 16, cols_max = (kv_len + 31) / 32 * 32;
  s.scores.resize(16 * cols_max), s.probs.resize(16 * cols_max), s.q.resize(16 * d);
  alignas(64) float o_tile[16 * 16];
  for (int64_t i0 = 0; i0 < q_len; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, q_len - i0);
    const int64_t key_blocks = (kv_len - q_len + i0 + rows + 15) / 16;  // as far as the block's last row sees
    const int64_t cols = (key_blocks * 16 + 31) / 32 * 32;
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t j = 0; j < d; j += 16) {
        const __m512 x = r < rows ? _mm512_mul_ps(_mm512_loadu_ps(q + (i0 + r) * q_stride + j), _mm512_set1_ps(scale))
                                  : _mm512_setzero_ps();
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.q.data() + r * d + j), (__m256i)_mm512_cvtneps_pbh(x));
      }
    compiler_barrier();
    for (int64_t c = 0; c < chunks; c += 2) {  // S = Q K^T, 16 keys per tile, 64 dims per pass
      const bool two = c + 1 < chunks;
      _tile_loadd(4, s.q.data() + c * 32, d * 2);
      if (two) _tile_loadd(5, s.q.data() + (c + 1) * 32, d * 2);
      for (int64_t j = 0; j < key_blocks; ++j) {
        if (c == 0) {
          _tile_zero(0);
        } else {
          _tile_loadd(0, s.scores.data() + j * 16, cols_max * 4);
        }
        _tile_loadd(6, kt + (j * chunks + c) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
          _tile_loadd(7, kt + (j * chunks + c + 1) * 256, 64);
          _tile_dpbf16ps(0, 5, 7);
        }
        store_tile(0, s.scores.data() + j * 16, cols_max * 4);
      }
    }
    float inv_total[16];
    for (int64_t r = 0; r < 16; ++r) {
      uint16_t* probs = s.probs.data() + r * cols_max;
      if (r < rows) {
        inv_total[r] = softmax_row_bf16(s.scores.data() + r * cols_max, kv_len - q_len + i0 + r + 1, cols, probs);
      } else {
        std::memset(probs, 0, cols * sizeof(uint16_t));
        inv_total[r] = 0.f;
      }
    }
    compiler_barrier();
    for (int64_t c0 = 0; c0 < vchunks; c0 += 4) {  // O = P V, up to 64 output dims per pass
      const int64_t nc = std::min<int64_t>(4, vchunks - c0);
      for (int c = 0; c < nc; ++c) tile_zero_acc(c);
      for (int64_t jb = 0; jb < cols / 32; ++jb) {
        _tile_loadd(4, s.probs.data() + jb * 32, cols_max * 2);
        for (int c = 0; c < nc; ++c) {
          _tile_loadd(6, vt + (jb * vchunks + c0 + c) * 512, 64);
          tile_dp_acc(c);
        }
      }
      for (int c = 0; c < nc; ++c) {
        store_tile(c, o_tile, 64);
        for (int64_t r = 0; r < rows; ++r)
          _mm512_storeu_ps(out + (i0 + r) * out_stride + (c0 + c) * 16,
                           _mm512_mul_ps(_mm512_loadu_ps(o_tile + r * 16), _mm512_set1_ps(inv_total[r])));
      }
    }
  }
}

// The long sequences `long_seqs` of a step: first each (sequence, KV head) lays out its tiles, then
// one work item per (sequence, query head) attends.
void amx_prefill_attention(const float* q, int64_t q_stride, const at::BFloat16* k, const at::BFloat16* v,
                           const int64_t* info, const int64_t* slots, const std::vector<int64_t>& long_seqs,
                           int64_t nh, int64_t nkv, int64_t d, float scale, float* out) {
  const int64_t group = nh / nkv, n = static_cast<int64_t>(long_seqs.size());
  std::vector<int64_t> kt_at(n * nkv + 1, 0), vt_at(n * nkv + 1, 0);  // each layout's offset
  for (int64_t i = 0; i < n * nkv; ++i) {
    const int64_t kv_len = info[long_seqs[i / nkv] * 4 + 2];
    kt_at[i + 1] = kt_at[i] + (kv_len + 15) / 16 * (d / 32) * 256;
    vt_at[i + 1] = vt_at[i] + (kv_len + 31) / 32 * (d / 16) * 512;
  }
  thread_local std::vector<uint32_t> kt_buffer;  // the calling thread's, shared with the workers below
  thread_local std::vector<uint16_t> vt_buffer;
  std::vector<uint32_t>& kt = kt_buffer;
  std::vector<uint16_t>& vt = vt_buffer;
  kt.resize(kt_at.back()), vt.resize(vt_at.back());
  at::parallel_for(0, n * nkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = long_seqs[i / nkv], g = i % nkv;
      const int64_t* seq_slots = slots + info[b * 4 + 3];
      layout_keys(reinterpret_cast<const uint16_t*>(k) + g * d, seq_slots, info[b * 4 + 2], nkv * d, d,
                  kt.data() + kt_at[i]);
      layout_values(reinterpret_cast<const uint16_t*>(v) + g * d, seq_slots, info[b * 4 + 2], nkv * d, d,
                    vt.data() + vt_at[i]);
    }
  });
  at::parallel_for(0, n * nh, 1, [&](int64_t begin, int64_t end) {
    thread_local AttentionScratch scratch;  // this worker's
    amx_configure_attention();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / nh, b = long_seqs[i], h = item % nh, layout = i * nkv + h / group;
      const int64_t q_start = info[b * 4], q_len = info[b * 4 + 1], kv_len = info[b * 4 + 2];
      amx_attend_head(q + q_start * q_stride + h * d, q_stride, kt.data() + kt_at[layout], vt.data() + vt_at[layout],
                      q_len, kv_len, d, scale, out + (q_start * nh + h) * d, nh * d, scratch);
    }
    _tile_release();
  });
}

// Whether a sequence of this step goes to amx_prefill_attention.
template <typename T>
bool amx_attention_takes(int64_t q_len, int64_t d) {
  return std::is_same_v<T, at::BFloat16> && q_len >= kAmxAttentionMinRows && d % 32 == 0 && amx_enabled();
}
#else
template <typename T>
bool amx_attention_takes(int64_t, int64_t) { return false; }
#endif

// Query head h of token t is at q + t * q_stride + h * d (q_stride lets the fused step read the
// rotated q heads straight out of its qkv rows); the output is [T, nh, d]. Work items are
// (sequence, KV head, query row), so the heads sharing a KV head read it once.
template <typename T>
void paged_attention_impl(const float* q, int64_t q_stride, const T* k, const T* v, const int64_t* info,
                          const int64_t* slots, int64_t num_seqs, int64_t nh, int64_t nkv, int64_t d, float scale,
                          float* out) {
  const int64_t group = nh / nkv;
  TORCH_CHECK(group <= kMaxGroup, "paged_attention: at most ", kMaxGroup, " query heads per KV head");
  int64_t max_kv = 1;
  std::vector<int64_t> first_item(num_seqs + 1, 0);  // work items of sequence b: [first_item[b], first_item[b+1])
  std::vector<int64_t> long_seqs;  // prefill chunks, for the tile unit
  for (int64_t b = 0; b < num_seqs; ++b) {
    const bool tiles = amx_attention_takes<T>(info[b * 4 + 1], d);
    if (tiles) long_seqs.push_back(b);
    else max_kv = std::max(max_kv, info[b * 4 + 2]);
    first_item[b + 1] = first_item[b] + (tiles ? 0 : info[b * 4 + 1] * nkv);
  }
#ifdef SPECACHE_AMX
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (!long_seqs.empty())
      amx_prefill_attention(q, q_stride, k, v, info, slots, long_seqs, nh, nkv, d, scale, out);
  }
#endif
  if (first_item[num_seqs] == 0) return;
  at::parallel_for(0, first_item[num_seqs], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * max_kv);
    int64_t b = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[b + 1]) ++b;
      const int64_t q_start = info[b * 4], q_len = info[b * 4 + 1], kv_len = info[b * 4 + 2];
      const int64_t i = (item - first_item[b]) / nkv, g = (item - first_item[b]) % nkv;
      const int64_t t = q_start + i;
      // Causal with an offset: query i sees the cached prefix and the new tokens up to itself.
      attend_group(q + t * q_stride + g * group * d, group, k + g * d, v + g * d, slots + info[b * 4 + 3],
                   kv_len - q_len + i + 1, nkv * d, scale, scores.data(), out + (t * nh + g * group) * d, d);
    }
  });
}

}  // namespace

// Whether paged_attention takes prefill chunks of any length on a bf16 cache (on AMX tiles).
bool amx_attention_available() {
#ifdef SPECACHE_AMX
  return amx_enabled();
#else
  return false;
#endif
}

// The kernels index raw memory with slot ids and step metadata: a bad one would corrupt the heap
// instead of raising (as index_copy_ did), so they are checked once per call (O(tokens + slots),
// nothing next to the math).
void check_slots(const torch::Tensor& slots, int64_t num_slots, const char* who) {
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, who, ": slot ", sp[i], " outside the cache (", num_slots, " slots)");
}

void check_step_indices(const torch::Tensor& info, const torch::Tensor& slots, int64_t tokens, int64_t num_slots,
                        const char* who) {
  TORCH_CHECK(info.dim() == 2 && info.size(1) == 4, who, ": seq_info must be [B, 4]");
  const int64_t* ip = info.data_ptr<int64_t>();
  for (int64_t b = 0; b < info.size(0); ++b) {
    const int64_t q_start = ip[b * 4], q_len = ip[b * 4 + 1], kv_len = ip[b * 4 + 2], offset = ip[b * 4 + 3];
    TORCH_CHECK(q_start >= 0 && q_len >= 1 && q_start + q_len <= tokens && q_len <= kv_len && offset >= 0 &&
                    offset + kv_len <= slots.numel(),
                who, ": sequence ", b, " does not fit the step (q_start ", q_start, ", q_len ", q_len, ", kv_len ",
                kv_len, ")");
  }
  check_slots(slots, num_slots, who);
}

// q [T, nh, d]; k_slots / v_slots [S, nkv, d] (fp32 or bf16); seq_info [B, 4] int64 rows of
// (q_start, q_len, kv_len, offset into slots); slots: each sequence's kv_len flat slot ids, concatenated.
// Returns [T, nh, d] in q's dtype.
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_slots, const torch::Tensor& v_slots,
                              const torch::Tensor& seq_info, const torch::Tensor& slots, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_slots.dim() == 3 && k_slots.sizes() == v_slots.sizes(), "paged_attention: shapes");
  TORCH_CHECK(k_slots.is_contiguous() && v_slots.is_contiguous(), "paged_attention: cache must be contiguous");
  TORCH_CHECK(k_slots.scalar_type() == v_slots.scalar_type(), "paged_attention: k and v dtypes differ");
  TORCH_CHECK(q.size(2) == k_slots.size(2) && q.size(1) % k_slots.size(1) == 0, "paged_attention: head shapes");
  TORCH_CHECK(seq_info.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong, "paged_attention: ids");
  TORCH_CHECK(q.is_cpu() && k_slots.is_cpu(), "paged_attention: CPU tensors only");
  const auto qf = q.to(torch::kFloat).contiguous();
  const auto info = seq_info.contiguous();
  const auto sl = slots.contiguous();
  check_step_indices(info, sl, q.size(0), k_slots.size(0), "paged_attention");
  auto out = torch::empty_like(qf);
  const int64_t nh = q.size(1), nkv = k_slots.size(1), d = q.size(2);
  if (k_slots.scalar_type() == torch::kFloat) {
    paged_attention_impl(qf.data_ptr<float>(), nh * d, k_slots.data_ptr<float>(), v_slots.data_ptr<float>(),
                         info.data_ptr<int64_t>(), sl.data_ptr<int64_t>(), info.size(0), nh, nkv, d,
                         static_cast<float>(scale), out.data_ptr<float>());
  } else {
    TORCH_CHECK(k_slots.scalar_type() == torch::kBFloat16, "paged_attention: cache dtype must be fp32 or bf16");
    paged_attention_impl(qf.data_ptr<float>(), nh * d, k_slots.data_ptr<at::BFloat16>(),
                         v_slots.data_ptr<at::BFloat16>(),
                         info.data_ptr<int64_t>(), sl.data_ptr<int64_t>(), info.size(0), nh, nkv, d,
                         static_cast<float>(scale), out.data_ptr<float>());
  }
  return q.scalar_type() == torch::kFloat ? out : out.to(q.scalar_type());
}

namespace {

void rms_norm(const float* x, const float* weight, int64_t m, int64_t h, float eps, float* out) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * h;
    float* yr = out + r * h;
    int64_t i = 0;
    float sum = 0.f;
#ifdef SPECACHE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= h; i += 16) {
      const __m512 v = _mm512_loadu_ps(xr + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < h; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
    i = 0;
#ifdef SPECACHE_AVX512
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i + 16 <= h; i += 16)
      _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), vinv), _mm512_loadu_ps(weight + i)));
#endif
    for (; i < h; ++i) yr[i] = xr[i] * inv * weight[i];
  }
}

// Hugging Face rotate-half RoPE in place on `heads` heads of one token; signed_sin has the first half negated.
void rope(float* x, int64_t heads, int64_t d, const float* cos, const float* signed_sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * cos[i] + b * signed_sin[i];
      xh[i + half] = b * cos[i + half] + a * signed_sin[i + half];
    }
  }
}

template <typename T>
void store_kv(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One token's qkv row [(nh + 2 nkv) * hd]: RoPE on its q and k heads (in place), then its k and v
// into cache slot `slot` of k_slots / v_slots [S, nkv, hd].
template <typename C>
void rope_and_store_row(float* row, int64_t nh, int64_t nkv, int64_t hd, const float* cos, const float* signed_sin,
                        C* k_slots, C* v_slots, int64_t slot) {
  const int64_t q_size = nh * hd, kv_size = nkv * hd;
  rope(row, nh + nkv, hd, cos, signed_sin);
  store_kv(row + q_size, k_slots + slot * kv_size, kv_size);
  store_kv(row + q_size + kv_size, v_slots + slot * kv_size, kv_size);
}

// act[j] = silu(gate[j]) * up[j], silu(x) = x * sigmoid(x).
void swiglu(const float* gate, const float* up, float* act, int64_t n) {
  int64_t j = 0;
#ifdef SPECACHE_AVX512
  // sigmoid from e = exp(-|x|) <= 1 (no overflow): 1 / (1 + e) for x >= 0, e / (1 + e) below.
  const __m512 one = _mm512_set1_ps(1.f);
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_loadu_ps(gate + j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), one, e);
    const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
    _mm512_storeu_ps(act + j, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(up + j)));
  }
#endif
  for (; j < n; ++j) act[j] = gate[j] / (1.f + std::exp(-gate[j])) * up[j];
}

struct QuantWeight {
  torch::Tensor q, scale, packed;  // int8 [N, K], fp32 [N], tile layout of q (empty without AMX / VNNI)
  int64_t n() const { return q.size(0); }
  void apply(const float* x, int64_t m, float* y) const {
    quant_gemm(q.data_ptr<int8_t>(), packed.defined() ? packed.data_ptr<int8_t>() : nullptr,
               scale.data_ptr<float>(), x, m, q.size(1), q.size(0), y);
  }
};

struct Layer {
  torch::Tensor attn_norm, ffn_norm, qkv_bias;  // fp32; qkv_bias undefined when the model has none
  QuantWeight qkv, o, gate_up, down;
};

}  // namespace

// A whole decode / verification step of the decoder layers in one native call: RMSNorm, int8
// projections, RoPE, K/V write, paged attention, SwiGLU, residuals. Activations stay fp32.
// Python keeps one instance per model (the weights are referenced, not copied).
class FusedDecoder {
 public:
  FusedDecoder(const std::vector<std::vector<torch::Tensor>>& layers, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, double eps)
      : nh_(num_heads), nkv_(num_kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(nkv_ > 0 && nh_ % nkv_ == 0 && nh_ / nkv_ <= kMaxGroup, "FusedDecoder: head counts");
    // Each layer: attn_norm, ffn_norm, qkv_bias (or an empty tensor), then q / scale / tile-packed q
    // (tile_pack's result, possibly empty) of qkv, o, gate_up and down.
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 15, "FusedDecoder: 15 tensors per layer");
      auto f32 = [](const torch::Tensor& x) { return x.to(torch::kFloat).contiguous(); };
      auto quant = [&](size_t i) {
        TORCH_CHECK(t[i].scalar_type() == torch::kInt8 && t[i].is_contiguous(), "FusedDecoder: int8 weights");
        return QuantWeight{t[i], f32(t[i + 1]), t[i + 2].numel() == t[i].numel() ? t[i + 2] : torch::Tensor()};
      };
      layers_.push_back(Layer{f32(t[0]), f32(t[1]), t[2].numel() ? f32(t[2]) : torch::Tensor(), quant(3), quant(6),
                              quant(9), quant(12)});
    }
  }

  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& cos, const torch::Tensor& signed_sin, const torch::Tensor& slot_mapping,
                        const torch::Tensor& seq_info, const torch::Tensor& slots, int64_t num_layers) {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.is_cpu() &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == nkv_ && k_cache.size(3) == hd_,
                "FusedDecoder: cache must be contiguous CPU [layers, slots, kv_heads, head_dim]");
    TORCH_CHECK(hidden.dim() == 2 && cos.size(0) == hidden.size(0) && cos.size(-1) == hd_ &&
                    signed_sin.sizes() == cos.sizes() && slot_mapping.numel() == hidden.size(0),
                "FusedDecoder: hidden [T, H], cos / sin [T, head_dim], slot_mapping [T]");
    TORCH_CHECK(num_layers >= 0 && num_layers <= static_cast<int64_t>(layers_.size()), "FusedDecoder: num_layers");
    if (k_cache.scalar_type() == torch::kFloat) return run<float>(hidden, k_cache, v_cache, cos, signed_sin,
                                                                   slot_mapping, seq_info, slots, num_layers);
    TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16, "FusedDecoder: cache dtype must be fp32 or bf16");
    return run<at::BFloat16>(hidden, k_cache, v_cache, cos, signed_sin, slot_mapping, seq_info, slots, num_layers);
  }

 private:
  template <typename T>
  torch::Tensor run(const torch::Tensor& hidden, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                    const torch::Tensor& cos_t, const torch::Tensor& sin_t, const torch::Tensor& slot_mapping,
                    const torch::Tensor& seq_info, const torch::Tensor& slots_t, int64_t num_layers) {
    auto h = hidden.to(torch::kFloat).contiguous().clone();
    const auto cos = cos_t.to(torch::kFloat).contiguous(), sin = sin_t.to(torch::kFloat).contiguous();
    const auto info = seq_info.contiguous(), slots = slots_t.contiguous(), new_slots = slot_mapping.contiguous();
    check_step_indices(info, slots, hidden.size(0), k_cache.size(1), "FusedDecoder");
    check_slots(new_slots, k_cache.size(1), "FusedDecoder (new tokens)");
    const int64_t t = h.size(0), dim = h.size(1), q_size = nh_ * hd_, kv_size = nkv_ * hd_;
    const int64_t qkv_size = q_size + 2 * kv_size;
    const int64_t layer_elems = k_cache.size(1) * kv_size;  // elements per layer of the cache
    float* hp = h.data_ptr<float>();
    std::vector<float> xn(t * dim), qkv(t * qkv_size), attn(t * q_size), proj(t * dim);
    std::vector<float> gate_up, act;
    for (int64_t l = 0; l < num_layers; ++l) {
      const Layer& w = layers_[l];
      rms_norm(hp, w.attn_norm.data_ptr<float>(), t, dim, eps_, xn.data());
      w.qkv.apply(xn.data(), t, qkv.data());
      T* kc = k_cache.data_ptr<T>() + l * layer_elems;
      T* vc = v_cache.data_ptr<T>() + l * layer_elems;
      const float* bias = w.qkv_bias.defined() ? w.qkv_bias.data_ptr<float>() : nullptr;
      for (int64_t i = 0; i < t; ++i) {
        float* row = qkv.data() + i * qkv_size;
        if (bias != nullptr)
          for (int64_t j = 0; j < qkv_size; ++j) row[j] += bias[j];
        rope_and_store_row(row, nh_, nkv_, hd_, cos.data_ptr<float>() + i * hd_, sin.data_ptr<float>() + i * hd_, kc,
                           vc, new_slots.data_ptr<int64_t>()[i]);
      }
      attention(qkv.data(), qkv_size, kc, vc, info, slots, attn.data());
      w.o.apply(attn.data(), t, proj.data());
      for (int64_t i = 0; i < t * dim; ++i) hp[i] += proj[i];
      rms_norm(hp, w.ffn_norm.data_ptr<float>(), t, dim, eps_, xn.data());
      const int64_t inter = w.gate_up.n() / 2;
      gate_up.resize(t * 2 * inter);
      act.resize(t * inter);
      w.gate_up.apply(xn.data(), t, gate_up.data());
      for (int64_t i = 0; i < t; ++i)
        swiglu(gate_up.data() + i * 2 * inter, gate_up.data() + i * 2 * inter + inter, act.data() + i * inter, inter);
      w.down.apply(act.data(), t, proj.data());
      for (int64_t i = 0; i < t * dim; ++i) hp[i] += proj[i];
    }
    return hidden.scalar_type() == torch::kFloat ? h : h.to(hidden.scalar_type());
  }

  template <typename T>
  void attention(const float* qkv, int64_t qkv_stride, const T* kc, const T* vc, const torch::Tensor& info,
                 const torch::Tensor& slots, float* out) const {
    paged_attention_impl(qkv, qkv_stride, kc, vc, info.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), info.size(0),
                         nh_, nkv_, hd_, 1.f / std::sqrt(static_cast<float>(hd_)), out);
  }

  std::vector<Layer> layers_;
  int64_t nh_, nkv_, hd_;
  float eps_;
};

// Row-wise ops of the op-by-op path (prefill chunks), in fp32 inside, one native call each instead
// of PyTorch's 4-6 (pow, mean, rsqrt, mul... in bf16 they were ~10% of a 1000-token prefill).
// Rows are widened one at a time into a per-thread buffer: widening a whole [2048, 3072] chunk
// into a fresh fp32 tensor cost 20 ms of page faults per call.
namespace {

template <typename T>
void widen_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void narrow_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// RMSNorm of x's rows into out. With `delta` (defined, x's shape) x += delta first, in place and
// rounded to x's dtype before the norm, as PyTorch's add then norm did: the residual add of the
// op-by-op path and the next norm in one pass.
template <typename T>
void rms_norm_typed(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, float eps,
                    torch::Tensor& out) {
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  T* xp = x.data_ptr<T>();
  const T* dp = delta.defined() ? delta.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    std::vector<float> in(h), more(dp != nullptr ? h : 0), normed(h);
    for (int64_t r = b; r < e; ++r) {
      widen_row(xp + r * h, in.data(), h);
      if (dp != nullptr) {
        widen_row(dp + r * h, more.data(), h);
        for (int64_t i = 0; i < h; ++i) in[i] += more[i];
        narrow_row(in.data(), xp + r * h, h);
        widen_row(xp + r * h, in.data(), h);
      }
      rms_norm(in.data(), weight.data_ptr<float>(), 1, h, eps, normed.data());
      narrow_row(normed.data(), op + r * h, h);
    }
  });
}

// rms_norm_typed on fp32 or bf16 rows; `who` names the caller in errors.
torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps,
                        const char* who) {
  const auto wf = weight.to(torch::kFloat).contiguous();
  TORCH_CHECK(wf.numel() == x.size(-1), who, ": weight size ", wf.numel(), " for rows of ", x.size(-1));
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat) rms_norm_typed<float>(x, delta, wf, static_cast<float>(eps), out);
  else if (x.scalar_type() == torch::kBFloat16) rms_norm_typed<at::BFloat16>(x, delta, wf, static_cast<float>(eps), out);
  else TORCH_CHECK(false, who, ": fp32 or bf16 rows");
  return out;
}

template <typename T>
void swiglu_typed(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    std::vector<float> gu(2 * inter), act(inter);
    for (int64_t r = b; r < e; ++r) {
      widen_row(gp + r * 2 * inter, gu.data(), 2 * inter);
      swiglu(gu.data(), gu.data() + inter, act.data(), inter);
      narrow_row(act.data(), op + r * inter, inter);
    }
  });
}

}  // namespace

torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return norm_rows(x.contiguous(), torch::Tensor(), weight, eps, "rms_norm");
}

// gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I], in gate_up's dtype.
torch::Tensor swiglu_rows(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "swiglu: expects [T, 2I]");
  const auto g = gate_up.contiguous();
  auto out = torch::empty({g.size(0), g.size(1) / 2}, g.options());
  if (g.scalar_type() == torch::kFloat) swiglu_typed<float>(g, out);
  else if (g.scalar_type() == torch::kBFloat16) swiglu_typed<at::BFloat16>(g, out);
  else TORCH_CHECK(false, "swiglu: fp32 or bf16 rows");
  return out;
}

namespace {

// RoPE on the q and k heads of qkv rows [T, (nh + 2 nkv) * hd] (q rotated in place), then each
// row's rotated k and its v into cache slot slots[i] of k_slots / v_slots [S, nkv, hd]. In fp32
// inside, the tables fp32 [T, hd] (signed_sin: first half negated).
template <typename T, typename C>
void rope_and_store_typed(torch::Tensor& qkv, const float* cos, const float* signed_sin, C* k_slots, C* v_slots,
                          const int64_t* slots, int64_t nh, int64_t nkv, int64_t hd) {
  const int64_t width = (nh + 2 * nkv) * hd;
  T* rows = qkv.data_ptr<T>();
  at::parallel_for(0, qkv.size(0), 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(width);
    for (int64_t i = b; i < e; ++i) {
      widen_row(rows + i * width, row.data(), width);
      rope_and_store_row(row.data(), nh, nkv, hd, cos + i * hd, signed_sin + i * hd, k_slots, v_slots, slots[i]);
      narrow_row(row.data(), rows + i * width, nh * hd);
    }
  });
}

template <typename T>
void rope_and_store_into(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_slots,
                         torch::Tensor& v_slots, const torch::Tensor& slots, int64_t nh, int64_t nkv) {
  const int64_t hd = k_slots.size(2);
  if (k_slots.scalar_type() == torch::kFloat) {
    rope_and_store_typed<T, float>(qkv, cos.data_ptr<float>(), sin.data_ptr<float>(), k_slots.data_ptr<float>(),
                                   v_slots.data_ptr<float>(), slots.data_ptr<int64_t>(), nh, nkv, hd);
  } else {
    TORCH_CHECK(k_slots.scalar_type() == torch::kBFloat16, "rope_and_store: cache must be fp32 or bf16");
    rope_and_store_typed<T, at::BFloat16>(qkv, cos.data_ptr<float>(), sin.data_ptr<float>(),
                                          k_slots.data_ptr<at::BFloat16>(), v_slots.data_ptr<at::BFloat16>(),
                                          slots.data_ptr<int64_t>(), nh, nkv, hd);
  }
}

}  // namespace

// hidden += delta (in place), then RMSNorm of the sum into a new tensor.
torch::Tensor add_rms_norm(torch::Tensor& hidden, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && delta.sizes() == hidden.sizes() &&
                  delta.scalar_type() == hidden.scalar_type(),
              "add_rms_norm: hidden and delta must be [T, H] of one dtype, hidden contiguous");
  return norm_rows(hidden, delta.contiguous(), weight, eps, "add_rms_norm");
}

void rope_and_store(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                    torch::Tensor& k_slots, torch::Tensor& v_slots, const torch::Tensor& slots, int64_t num_heads,
                    int64_t num_kv_heads) {
  TORCH_CHECK(k_slots.dim() == 3 && k_slots.is_contiguous() && v_slots.is_contiguous() &&
                  k_slots.sizes() == v_slots.sizes() && k_slots.scalar_type() == v_slots.scalar_type() &&
                  k_slots.size(1) == num_kv_heads,
              "rope_and_store: k/v slots must be contiguous [S, kv_heads, head_dim]");
  const int64_t hd = k_slots.size(2), t = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd,
              "rope_and_store: qkv must be contiguous [T, (heads + 2 kv_heads) * head_dim]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && signed_sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
                  signed_sin.is_contiguous() && cos.numel() == t * hd && signed_sin.numel() == t * hd,
              "rope_and_store: fp32 contiguous tables [T, head_dim]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == t,
              "rope_and_store: one int64 slot per row");
  check_slots(slots, k_slots.size(0), "rope_and_store");
  if (qkv.scalar_type() == torch::kFloat) rope_and_store_into<float>(qkv, cos, signed_sin, k_slots, v_slots, slots,
                                                                     num_heads, num_kv_heads);
  else if (qkv.scalar_type() == torch::kBFloat16)
    rope_and_store_into<at::BFloat16>(qkv, cos, signed_sin, k_slots, v_slots, slots, num_heads, num_kv_heads);
  else TORCH_CHECK(false, "rope_and_store: fp32 or bf16 rows");
}

// The index of each row's largest value (the first one on ties, as torch.argmax): greedy decoding
// reads 16 x 49k logits a step, where torch.argmax ran at ~1 GB/s (0.75 ms).
namespace {

int64_t argmax_row(const float* x, int64_t n) {
  int64_t j = 0, best = 0;
  float best_value = -INFINITY;
#ifdef SPECACHE_AVX512
  if (n >= 16) {
    __m512 vmax = _mm512_loadu_ps(x);
    __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), cur = vidx;
    const __m512i step = _mm512_set1_epi32(16);
    for (j = 16; j + 16 <= n; j += 16) {
      cur = _mm512_add_epi32(cur, step);
      const __m512 v = _mm512_loadu_ps(x + j);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strict: a lane keeps its first max
      vmax = _mm512_mask_mov_ps(vmax, greater, v);
      vidx = _mm512_mask_mov_epi32(vidx, greater, cur);
    }
    best_value = _mm512_reduce_max_ps(vmax);
    const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best_value), _CMP_EQ_OQ);
    best = _mm512_mask_reduce_min_epi32(at_max, vidx);
  }
#endif
  for (; j < n; ++j)
    if (x[j] > best_value) best_value = x[j], best = j;
  return best;
}

}  // namespace

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) > 0 && x.size(1) < (1LL << 31),
              "argmax_rows: x must be [rows, n] fp32");
  const auto xc = x.contiguous();
  auto out = torch::empty({xc.size(0)}, torch::kLong);
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = xc.size(1);
  at::parallel_for(0, xc.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

// Prompt lookup's search (specache.spec.ngram.find_match): the latest end j < n - 1 of the longest
// match (at most max_ngram tokens) of the text's last tokens, as (j, match length), or (-1, 0).
// One backward scan that stops at the first full-length match: ~1 us for a 500-token text, where
// the numpy version's few vector ops cost ~20-50 us, paid for every decoding sequence every step.
std::pair<int64_t, int64_t> ngram_match(const pybind11::array_t<int32_t, pybind11::array::c_style>& text,
                                        int64_t max_ngram, int64_t min_ngram) {
  const int32_t* t = text.data();
  const int64_t n = text.size();
  if (n < min_ngram + 1 || max_ngram < 1) return {-1, 0};
  int64_t best_end = -1, best_len = 0;
  for (int64_t j = n - 2; j >= 0 && best_len < max_ngram; --j) {
    int64_t len = 0;
    while (len < max_ngram && len <= j && t[j - len] == t[n - 1 - len]) ++len;
    if (len > best_len) best_end = j, best_len = len;
  }
  if (best_len < std::max<int64_t>(min_ngram, 1)) return {-1, 0};
  return {best_end, best_len};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("int8_linear", &int8_linear, "y = x @ (q * scale)^T (AMX tiles with packed, else the AVX-512 or AVX2 GEMV)", py::arg("x"), py::arg("q"),
        py::arg("scale"), py::arg("packed") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("dense_linear", &dense_linear, "y = x @ w^T for dense w, each row's outputs independent of the batch",
        py::arg("x"), py::arg("w"), py::arg("packed") = false, py::call_guard<py::gil_scoped_release>());
  m.def("dense_pack", &dense_pack, "w in the layout of dense_linear's packed path (empty where it does not run)");
  m.def("rms_norm", &rms_norm_rows, "RMSNorm over the last dim", py::call_guard<py::gil_scoped_release>());
  m.def("swiglu", &swiglu_rows, "silu(gate) * up of [T, 2I] rows", py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta (in place), then RMSNorm of it",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_and_store", &rope_and_store, "RoPE on qkv's q and k heads, k and v into their cache slots",
        py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "each row's argmax (first on ties)", py::call_guard<py::gil_scoped_release>());
  m.def("ngram_match", &ngram_match, "prompt lookup's (end, length) of the longest latest suffix match");
  m.attr("MAX_GROUP") = kMaxGroup;
#ifdef SPECACHE_AVX512BF16
  m.attr("BF16_DOT_PRODUCTS") = true;
#else
  m.attr("BF16_DOT_PRODUCTS") = false;
#endif
  m.def("amx_attention", &amx_attention_available, "whether bf16-cache prefill attention runs on AMX tiles");
  m.attr("AMX_ATTENTION_MIN_ROWS") = kAmxAttentionMinRows;
  m.def("tile_pack", &tile_pack, "q in the tile layout of the AMX / AVX512-VNNI paths (empty where neither runs)");
  m.def("paged_attention", &paged_attention, "attention of every sequence of a step over the flat KV slots",
        py::call_guard<py::gil_scoped_release>());
  py::class_<FusedDecoder>(m, "FusedDecoder")
      .def(py::init<const std::vector<std::vector<torch::Tensor>>&, int64_t, int64_t, int64_t, double>())
      .def("forward", &FusedDecoder::forward, py::call_guard<py::gil_scoped_release>());
}
