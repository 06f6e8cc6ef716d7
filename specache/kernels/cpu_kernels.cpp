// CPU kernels for the decode step, where PyTorch's general kernels leave speed on the table:
//  - int8_linear: y = x @ (q * scale)^T for a few rows of x (decode, verification). It streams
//    each int8 weight row once for all rows of x, so it runs at memory speed.
//  - paged_attention: attention of every sequence of a step in one call, reading its K/V straight
//    from the flat slot arrays (no gather copy, no per-sequence kernel launch).
// Built on first use with -march=native (torch.utils.cpp_extension); AVX-512 paths where the CPU
// has them, plain loops (auto-vectorised) otherwise.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPECACHE_AVX512 1
#endif

namespace {

constexpr int64_t kRowTile = 8;  // weight rows per task unit (read once for all rows of x)
constexpr int64_t kMaxXRows = 4;  // activation rows per register tile

#ifdef SPECACHE_AVX512
inline __m512 load_int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 load_int8x16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// out[m][r] = scale[r] * dot(w[r], x[m]) for R weight rows and M activation rows (fp32 activations).
// Full 16-wide steps without masks; one masked step for a K that is not a multiple of 16.
template <int R, int M>
inline void dot_tile(const int8_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* out,
                     int64_t ldo, const float* scale) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  // The next tile's rows follow this one in memory: prefetch them while this one computes (a row is
  // only a few cache lines, too short for the hardware prefetcher to ramp up on).
  const char* next = reinterpret_cast<const char*>(w + R * ldw);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    for (int p = 0; p < R * 16; p += 64) _mm_prefetch(next + i * R + p, _MM_HINT_T0);
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_loadu_ps(x + m * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_int8x16(w + r * ldw + i);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
    }
  }
  if (i < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 xs[M];
    for (int m = 0; m < M; ++m) xs[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_int8x16(w + r * ldw + i, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]) * scale[r];
}
#else
template <int R, int M>
inline void dot_tile(const int8_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* out,
                     int64_t ldo, const float* scale) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      const int8_t* wr = w + r * ldw;
      const float* xm = x + m * ldx;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(wr[i]) * xm[i];
      out[m * ldo + r] = acc * scale[r];
    }
}
#endif

// A tile of `rows` weight rows: sub-tiles of R rows (R * M accumulators in registers), then single rows.
template <int M>
inline void row_tile(const int8_t* w, int64_t k, const float* x, float* y, int64_t n, const float* scale,
                     int64_t r, int64_t rows) {
  constexpr int R = M == 1 ? 8 : 4;
  int64_t i = r;
  for (; i + R <= r + rows; i += R) dot_tile<R, M>(w + i * k, k, x, k, k, y + i, n, scale + i);
  for (; i < r + rows; ++i) dot_tile<1, M>(w + i * k, k, x, k, k, y + i, n, scale + i);
}

// Rows row_begin .. row_end of y = x @ w^T; the activation rows go in groups of kMaxXRows inside
// each weight tile, so a tile is read from memory once and from L1 by the later groups.
void rows_any(const int8_t* w, int64_t k, const float* x, int64_t m_rows, float* y, int64_t n,
              const float* scale, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; r += kRowTile) {
    const int64_t rows = std::min(kRowTile, row_end - r);
    for (int64_t m = 0; m < m_rows; m += kMaxXRows) {
      const float* xm = x + m * k;
      float* ym = y + m * n;
      switch (std::min(kMaxXRows, m_rows - m)) {
        case 1: row_tile<1>(w, k, xm, ym, n, scale, r, rows); break;
        case 2: row_tile<2>(w, k, xm, ym, n, scale, r, rows); break;
        case 3: row_tile<3>(w, k, xm, ym, n, scale, r, rows); break;
        default: row_tile<4>(w, k, xm, ym, n, scale, r, rows); break;
      }
    }
  }
}

}  // namespace

namespace {

// y[M, N] = x[M, K] @ (w * scale)^T, split over threads by whole weight-row tiles.
void int8_gemm(const int8_t* w, const float* scale, const float* x, int64_t m, int64_t k, int64_t n, float* y) {
  // Grain: at least ~64 KB of weights per task, so small layers do not pay for waking a thread.
  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * kRowTile, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
    rows_any(w, k, x, m, y, n, scale, tb * kRowTile, std::min(n, te * kRowTile));
  });
}

}  // namespace

// x [M, K] (fp32 or bf16), q [N, K] int8, scale [N] fp32 -> [M, N] in x's dtype.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: shapes ", x.sizes(), " ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scale.scalar_type() == torch::kFloat, "int8_linear: dtypes");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous(), "int8_linear: q and scale must be contiguous");
  const auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), q.size(0)}, xf.options());
  int8_gemm(q.data_ptr<int8_t>(), scale.data_ptr<float>(), xf.data_ptr<float>(), xf.size(0), xf.size(1), q.size(0),
            y.data_ptr<float>());
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

namespace {

#ifdef SPECACHE_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = (d - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(k + i, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = (d - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(av, load16(v + i, m), _mm512_maskz_loadu_ps(m, out + i)));
  }
}
#else
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float acc = 0.f;
  for (int64_t i = 0; i < d; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] += a * static_cast<float>(v[i]);
}
#endif

// One query row of one head against its visible keys: out = softmax(scale * q K^T) V.
template <typename T>
void attend_one(const float* q, const T* k_base, const T* v_base, const int64_t* slots, int64_t visible,
                int64_t slot_stride, float scale, float* scores, float* out, int64_t d) {
  float max_score = -INFINITY;
  for (int64_t j = 0; j < visible; ++j) {
    scores[j] = dot(q, k_base + slots[j] * slot_stride, d) * scale;
    max_score = std::max(max_score, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < visible; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    total += scores[j];
  }
  std::fill(out, out + d, 0.f);
  for (int64_t j = 0; j < visible; ++j) axpy(scores[j], v_base + slots[j] * slot_stride, out, d);
  const float inv = 1.f / total;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

// Query head h of token t is at q + t * q_stride + h * d (q_stride lets the fused step read the
// rotated q heads straight out of its qkv rows); the output is [T, nh, d].
template <typename T>
void paged_attention_impl(const float* q, int64_t q_stride, const T* k, const T* v, const int64_t* info,
                          const int64_t* slots, int64_t num_seqs, int64_t nh, int64_t nkv, int64_t d, float scale,
                          float* out) {
  const int64_t group = nh / nkv;
  int64_t max_kv = 1;
  for (int64_t b = 0; b < num_seqs; ++b) max_kv = std::max(max_kv, info[b * 4 + 2]);
  at::parallel_for(0, num_seqs * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(max_kv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nh, h = item % nh;
      const int64_t q_start = info[b * 4], q_len = info[b * 4 + 1], kv_len = info[b * 4 + 2];
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t t = q_start + i;
        // Causal with an offset: query i sees the cached prefix and the new tokens up to itself.
        attend_one(q + t * q_stride + h * d, k + (h / group) * d, v + (h / group) * d, slots + info[b * 4 + 3],
                   kv_len - q_len + i + 1, nkv * d, scale, scores.data(), out + (t * nh + h) * d, d);
      }
    }
  });
}

}  // namespace

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
  const auto qf = q.to(torch::kFloat).contiguous();
  const auto info = seq_info.contiguous();
  const auto sl = slots.contiguous();
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
    float sum = 0.f;
    for (int64_t i = 0; i < h; ++i) sum += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
    for (int64_t i = 0; i < h; ++i) out[r * h + i] = xr[i] * inv * weight[i];
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

float silu(float x) { return x / (1.f + std::exp(-x)); }

struct QuantWeight {
  torch::Tensor q, scale;  // int8 [N, K], fp32 [N]
  int64_t n() const { return q.size(0); }
  void apply(const float* x, int64_t m, float* y) const {
    int8_gemm(q.data_ptr<int8_t>(), scale.data_ptr<float>(), x, m, q.size(1), q.size(0), y);
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
    // Each layer: attn_norm, ffn_norm, qkv_bias (or an empty tensor), then q/scale of qkv, o, gate_up, down.
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 11, "FusedDecoder: 11 tensors per layer");
      auto f32 = [](const torch::Tensor& x) { return x.to(torch::kFloat).contiguous(); };
      auto quant = [&](size_t i) {
        TORCH_CHECK(t[i].scalar_type() == torch::kInt8 && t[i].is_contiguous(), "FusedDecoder: int8 weights");
        return QuantWeight{t[i], f32(t[i + 1])};
      };
      layers_.push_back(Layer{f32(t[0]), f32(t[1]), t[2].numel() ? f32(t[2]) : torch::Tensor(), quant(3), quant(5),
                              quant(7), quant(9)});
    }
  }

  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& cos, const torch::Tensor& signed_sin, const torch::Tensor& slot_mapping,
                        const torch::Tensor& seq_info, const torch::Tensor& slots, int64_t num_layers) {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(), "FusedDecoder: cache");
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
    const int64_t t = h.size(0), dim = h.size(1), q_size = nh_ * hd_, kv_size = nkv_ * hd_;
    const int64_t qkv_size = q_size + 2 * kv_size;
    const int64_t layer_slots = k_cache.size(1) * kv_size;  // elements per layer of the cache
    float* hp = h.data_ptr<float>();
    std::vector<float> xn(t * dim), qkv(t * qkv_size), attn(t * q_size), proj(t * dim);
    std::vector<float> gate_up, act;
    for (int64_t l = 0; l < num_layers; ++l) {
      const Layer& w = layers_[l];
      rms_norm(hp, w.attn_norm.data_ptr<float>(), t, dim, eps_, xn.data());
      w.qkv.apply(xn.data(), t, qkv.data());
      T* kc = k_cache.data_ptr<T>() + l * layer_slots;
      T* vc = v_cache.data_ptr<T>() + l * layer_slots;
      for (int64_t i = 0; i < t; ++i) {
        float* row = qkv.data() + i * qkv_size;
        if (w.qkv_bias.defined())
          for (int64_t j = 0; j < qkv_size; ++j) row[j] += w.qkv_bias.data_ptr<float>()[j];
        rope(row, nh_ + nkv_, hd_, cos.data_ptr<float>() + i * hd_, sin.data_ptr<float>() + i * hd_);
        const int64_t slot = new_slots.data_ptr<int64_t>()[i];
        store_kv(row + q_size, kc + slot * kv_size, kv_size);
        store_kv(row + q_size + kv_size, vc + slot * kv_size, kv_size);
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
        for (int64_t j = 0; j < inter; ++j)
          act[i * inter + j] = silu(gate_up[i * 2 * inter + j]) * gate_up[i * 2 * inter + inter + j];
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("int8_linear", &int8_linear, "y = x @ (q * scale)^T for a few rows of x",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention", &paged_attention, "attention of every sequence of a step over the flat KV slots",
        py::call_guard<py::gil_scoped_release>());
  py::class_<FusedDecoder>(m, "FusedDecoder")
      .def(py::init<const std::vector<std::vector<torch::Tensor>>&, int64_t, int64_t, int64_t, double>())
      .def("forward", &FusedDecoder::forward, py::call_guard<py::gil_scoped_release>());
}
