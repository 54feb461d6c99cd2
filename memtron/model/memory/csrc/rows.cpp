// CPU kernels for value tables (memtron.model.memory.cpu_kernels): the sparse backward of the
// weighted bag gather in one pass over the distinct rows, the sparse optimizer's row update
// in place, one pass over each touched row and its state (the torch path gathers rows and
// moments into [U, d] temporaries, updates them in several passes and scatters them back), and
// the table's counter-based normal init.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

template <typename T>
inline float as_float(T x) { return static_cast<float>(x); }

inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

constexpr int64_t kAhead = 4;  // rows prefetched ahead (hits' grads, optimizer rows)
constexpr int64_t kRowsAhead = 2;  // table rows prefetched ahead in the backward
constexpr int kRadixBits = 11;  // digits of the LSD radix sort: 2 passes up to 4M rows

inline void prefetch_row(const void* row, int64_t nbytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch(p + b);
}

// Hits sorted by (id, hit) into ``order``: a stable LSD radix sort of the hit numbers by id, as
// many passes as the largest id needs. std::sort of (id, hit) pairs took ~25 ms for 262K hits;
// this ~3 ms.
void sort_hits_by_id(const int64_t* id, int64_t n_hits, int64_t* order) {
  std::vector<int64_t> scratch(n_hits);
  int64_t max_id = 0;
  for (int64_t i = 0; i < n_hits; ++i) {
    order[i] = i;
    max_id = std::max(max_id, id[i]);
  }
  int64_t* src = order;
  int64_t* dst = scratch.data();
  std::vector<int64_t> count(int64_t{1} << kRadixBits);
  for (int shift = 0; shift == 0 || (max_id >> shift) > 0; shift += kRadixBits) {
    const int64_t mask = (int64_t{1} << kRadixBits) - 1;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n_hits; ++i) ++count[(id[src[i]] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = sum;
      sum += here;
    }
    for (int64_t i = 0; i < n_hits; ++i) dst[count[(id[src[i]] >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != order) std::copy(src, src + n_hits, order);  // an odd number of passes
}

// Writes a finished row to its place in the output without reading that memory first (a
// non-temporal store: the row gradients are hundreds of MB, read back only by the optimizer),
// where SSE2 is there and the row is 16-byte aligned; a plain copy otherwise.
inline void stream_row(float* dst, const float* src, int64_t dim) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && dim % 4 == 0) {
    for (int64_t c = 0; c < dim; c += 4) _mm_stream_ps(dst + c, _mm_loadu_ps(src + c));
    return;
  }
#endif
  std::memcpy(dst, src, dim * sizeof(float));
}

// One distinct row u: rows[u] = sum_j w[j] * grad[bag[j]]; with weight_grad also
// grad_w[hit j] = <grad[bag[j]], table[id]>, the table row read once for all its hits.
// Hits j are in id order (``order``), so the output gradients of the next hits and the table
// rows of the next distinct ids are known ahead and prefetched: both are random rows.
template <typename T>
void backward_rows(const float* grad, int64_t grad_stride, const T* table, int64_t table_stride,
                   const int64_t* order, const int64_t* starts, const int64_t* unique,
                   const int64_t* bags, const float* weights, int64_t n_unique, int64_t dim,
                   bool weight_grad, float* rows, float* grad_w) {
  const int64_t n_hits = starts[n_unique];
  at::parallel_for(0, n_unique, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> value(weight_grad ? dim : 0), acc(dim);
    for (int64_t u = begin; u < end; ++u) {
      if (weight_grad && u + kRowsAhead < end)
        prefetch_row(table + unique[u + kRowsAhead] * table_stride, dim * sizeof(T));
      if (weight_grad) {
        const T* src = table + unique[u] * table_stride;
        for (int64_t c = 0; c < dim; ++c) value[c] = as_float(src[c]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float* a = acc.data();
      for (int64_t j = starts[u]; j < starts[u + 1]; ++j) {
        if (j + kAhead < n_hits)
          prefetch_row(grad + bags[order[j + kAhead]] * grad_stride, dim * sizeof(float));
        const int64_t hit = order[j];
        const float* g = grad + bags[hit] * grad_stride;
        const float w = weights[hit];
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) a[c] += w * g[c];
        if (weight_grad) {
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < dim; ++c) dot += g[c] * value[c];
          grad_w[hit] = dot;
        }
      }
      stream_row(rows + u * dim, a, dim);
    }
#if defined(__SSE2__)
    _mm_sfence();  // the streamed rows are visible before the caller reads them
#endif
  });
}

// -- the row update ------------------------------------------------------------------------

// counter_rng.mix32 in wrapping uint32 arithmetic (the Python side computes the same products
// in int64 and masks them).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

// counter_rng.stochastic_round_bf16 of one element: 16 random bits added to the bits bf16
// drops (counter_rng.element_bits of the row's key and the column), then truncated.
inline at::BFloat16 round_bf16(float x, uint32_t key, int64_t col) {
  const uint32_t bits = mix32(mix32(static_cast<uint32_t>(col) * 0x9E3779B9u + key) ^ key);
  const uint32_t word = (float_bits(x) + (bits & 0xFFFFu)) & 0xFFFF0000u;
  at::BFloat16 out;
  out.x = static_cast<uint16_t>(word >> 16);
  return out;
}

inline void store(float* row, int64_t c, float x, const int64_t*, int64_t) { row[c] = x; }
inline void store(at::BFloat16* row, int64_t c, float x, const int64_t* key, int64_t col0) {
  row[c] = round_bf16(x, static_cast<uint32_t>(*key), col0 + c);
}

enum class Mode { kAdam, kAdamRowwiseV, kRowwiseAdagrad, kAdamB1ZeroRowwise };

Mode parse_mode(const std::string& name) {
  if (name == "adam") return Mode::kAdam;
  if (name == "adam_rowwise_v") return Mode::kAdamRowwiseV;
  if (name == "rowwise_adagrad") return Mode::kRowwiseAdagrad;
  if (name == "adam_b1zero_rowwise") return Mode::kAdamB1ZeroRowwise;
  TORCH_CHECK(false, "sparse_update: unknown mode ", name);
}

struct Scalars {
  float lerp_weight, beta2, one_minus_beta2, eps, neg_step_size;
  double beta2_d;
  int64_t step;
};

// One touched row ``id`` with fp32 gradient ``g``: its state and the row, in place, with the
// arithmetic of SparseRowOptimizer._update's torch path (torch's lerp, sqrt, then the division
// or the reciprocal per row). ``decay`` multiplies the row first (weight decay; 1 = none).
template <Mode mode, typename W, typename M>
void update_row(W* row, const float* g, int64_t dim, M* m, float* v_elem,
                float* v_row, int64_t* last, float decay, bool has_decay, const Scalars& s,
                const int64_t* key, int64_t col0) {
  float mean_sq = 0.0f;
  if constexpr (mode != Mode::kAdam) {
    double sum = 0.0;  // vector_norm's fp32 sum differs in order: accumulate wider
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < dim; ++c) sum += static_cast<double>(g[c]) * g[c];
    const float norm = static_cast<float>(std::sqrt(sum));
    mean_sq = norm * norm / static_cast<float>(dim);
  }
  float scale = 0.0f;  // the per-row 1 / (sqrt(stat) + eps)
  if constexpr (mode == Mode::kRowwiseAdagrad) {
    *v_row += mean_sq;
    scale = 1.0f / (std::sqrt(*v_row) + s.eps);
  } else if constexpr (mode == Mode::kAdamB1ZeroRowwise) {
    const float replay = static_cast<float>(std::pow(s.beta2_d, static_cast<double>(
        s.step - *last)));
    *v_row = *v_row * replay + s.one_minus_beta2 * mean_sq;
    *last = s.step;
    scale = 1.0f / (std::sqrt(*v_row) + s.eps);
  } else if constexpr (mode == Mode::kAdamRowwiseV) {
    *v_row = *v_row * s.beta2 + s.one_minus_beta2 * mean_sq;
    scale = 1.0f / (std::sqrt(*v_row) + s.eps);
  }
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) {
    float direction = g[c];
    if constexpr (mode == Mode::kAdam || mode == Mode::kAdamRowwiseV) {
      const float old = as_float(m[c]);
      direction = s.lerp_weight < 0.5f ? old + s.lerp_weight * (g[c] - old)
                                       : g[c] - (g[c] - old) * (1.0f - s.lerp_weight);
      m[c] = static_cast<M>(direction);
    }
    float x = as_float(row[c]);
    if (has_decay) x *= decay;
    if constexpr (mode == Mode::kAdam) {
      const float v = v_elem[c] * s.beta2 + (s.one_minus_beta2 * g[c]) * g[c];
      v_elem[c] = v;
      x += s.neg_step_size * (direction / (std::sqrt(v) + s.eps));
    } else {
      x += (s.neg_step_size * direction) * scale;
    }
    store(row, c, x, key, col0);
  }
}

// -- the init -----------------------------------------------------------------------------

// The file is built once per vector capability (cpu_kernels.ISA_FLAGS) with -ffp-contract=off:
// no multiply-add is fused, so every build draws the torch ops' bits.

// counter_rng.row_keys of global row ``row`` from the stream's base (counter_rng.stream_base).
inline uint32_t row_key(uint32_t base, int64_t row) {
  return mix32(mix32(static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32) ^ base) ^
               static_cast<uint32_t>(row));
}

// Constants as counter_rng.py has them (doubles rounded to float, as torch rounds scalars).
constexpr float kLogPoly[] = {
    static_cast<float>(7.0376836292e-2), static_cast<float>(-1.1514610310e-1),
    static_cast<float>(1.1676998740e-1), static_cast<float>(-1.2420140846e-1),
    static_cast<float>(1.4249322787e-1), static_cast<float>(-1.6668057665e-1),
    static_cast<float>(2.0000714765e-1), static_cast<float>(-2.4999993993e-1),
    static_cast<float>(3.3333331174e-1)};
constexpr float kSinPoly[] = {static_cast<float>(-1.9515295891e-4),
                              static_cast<float>(8.3321608736e-3),
                              static_cast<float>(-1.6666654611e-1)};
constexpr float kCosPoly[] = {static_cast<float>(2.443315711809948e-5),
                              static_cast<float>(-1.388731625493765e-3),
                              static_cast<float>(4.166664568298827e-2)};
constexpr float kLn2Low = static_cast<float>(-2.12194440e-4), kLn2High = 0.693359375f;
constexpr float kHalfPi = static_cast<float>(1.57079632679489661923);
constexpr uint32_t kSqrtHalfBits = 0x3F3504F3u, kOneBits = 0x3F800000u;

// counter_rng._log: ln(u) for u in [2^-24, 1], branch-free.
inline float log_poly(float u) {
  const uint32_t i = float_bits(u) + (kOneBits - kSqrtHalfBits);
  const float e = static_cast<float>(static_cast<int32_t>(i >> 23) - 0x7F);
  const float x = bits_float((i & 0x7FFFFFu) + kSqrtHalfBits) - 1.0f;
  const float z = x * x;
  float y = kLogPoly[0];
  for (int k = 1; k < 9; ++k) y = y * x + kLogPoly[k];
  y = y * x * z;
  y = y + e * kLn2Low;
  y = y - z * 0.5f;
  return x + y + e * kLn2High;
}

constexpr int64_t kPopulateBytes = 1 << 20;  // bytes of rows the init faults in per call

// Faults in the whole pages of [begin, end) with one call (MADV_POPULATE_WRITE, Linux 5.14+)
// where the first writes would take one trap per page: on the 2-core VM measured, faulting in
// and zeroing a fresh table's pages costs more than drawing its values, and one call per MiB
// took ~20% off the init (fewer traps; the zeroing stays). Where the call is missing or fails,
// the writes fault the pages in as before.
inline void populate(char* begin, char* end) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) & ~(page - 1);
  const uintptr_t last = reinterpret_cast<uintptr_t>(end) & ~(page - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
#else
  (void)begin;
  (void)end;
#endif
}

// counter_rng.normal's values of columns 2p and 2p + 1 (``counter`` = 2p) of the row keyed
// by k1, k2 into out[0], out[1]: one mix32 per uniform, Box-Muller with the polynomials above
// and bit selects for the quadrant (no branches: the loop over p vectorizes).
inline void normal_pair(uint32_t counter, uint32_t k1, uint32_t k2, float neg_two_var,
                        float* out) {
  const uint32_t radius_bits = mix32((counter * 0x9E3779B9u + k1) ^ k2);
  const uint32_t angle_bits = mix32(((counter + 1) * 0x9E3779B9u + k1) ^ k2);
  const float u = static_cast<float>(static_cast<int32_t>((radius_bits >> 8) + 1)) *
                  5.9604644775390625e-8f;  // 2^-24
  const float radius = std::sqrt(log_poly(u) * neg_two_var);
  const uint32_t quadrant = angle_bits >> 30;
  const float x = (static_cast<float>(static_cast<int32_t>((angle_bits >> 8) & 0x3FFFFFu)) *
                   2.384185791015625e-7f - 0.5f) * kHalfPi;  // 2^-22
  const float z = x * x;
  float sin_x = kSinPoly[0], cos_x = kCosPoly[0];
  for (int k = 1; k < 3; ++k) {
    sin_x = sin_x * z + kSinPoly[k];
    cos_x = cos_x * z + kCosPoly[k];
  }
  sin_x = sin_x * z * x + x;
  cos_x = cos_x * z * z - z * 0.5f + 1.0f;
  // (cos, sin) of x + quadrant * pi/2: swapped in odd quadrants, then the quadrant's signs
  const uint32_t odd = 0u - (quadrant & 1u);
  const uint32_t sin_b = float_bits(sin_x), cos_b = float_bits(cos_x);
  const uint32_t first_sign = ((quadrant ^ (quadrant >> 1)) & 1u) << 31;
  out[0] = bits_float(((sin_b & odd) | (cos_b & ~odd)) ^ first_sign) * radius;
  out[1] = bits_float(((cos_b & odd) | (sin_b & ~odd)) ^ ((quadrant >> 1) << 31)) * radius;
}

// counter_rng.normal into rows [begin, end) of ``out`` (global rows row_start + r, columns
// col_start ... col_start + n_cols). fp32 rows of whole pairs take the values directly; others
// go through ``buffer`` (n_cols + 2 floats), then to the row (bf16: rounded to nearest even;
// the values are never NaN).
void normal_rows(void* out, bool bf16, int64_t stride, int64_t begin, int64_t end,
                 int64_t row_start, int64_t col_start, int64_t n_cols, uint32_t base1,
                 uint32_t base2, float neg_two_var, float* buffer) {
  const int64_t offset = col_start % 2, n_pairs = (offset + n_cols + 1) / 2;
  const uint32_t counter0 = static_cast<uint32_t>(col_start - offset);
  const bool direct = !bf16 && offset == 0 && n_cols % 2 == 0;
  for (int64_t r = begin; r < end; ++r) {
    const uint32_t k1 = row_key(base1, row_start + r), k2 = row_key(base2, row_start + r);
    float* values = direct ? static_cast<float*>(out) + r * stride : buffer;
#pragma omp simd
    for (int64_t p = 0; p < n_pairs; ++p)
      normal_pair(counter0 + 2 * static_cast<uint32_t>(p), k1, k2, neg_two_var, values + 2 * p);
    if (bf16) {
      uint16_t* row = static_cast<uint16_t*>(out) + r * stride;
#pragma omp simd
      for (int64_t c = 0; c < n_cols; ++c) {
        const uint32_t word = float_bits(buffer[offset + c]);
        row[c] = static_cast<uint16_t>((word + 0x7FFFu + ((word >> 16) & 1u)) >> 16);
      }
    } else if (!direct) {
      std::memcpy(static_cast<float*>(out) + r * stride, buffer + offset, n_cols * sizeof(float));
    }
  }
}

}  // namespace

// (sorted unique ids [U], fp32 row gradients [U, d], fp32 weight gradients [M] or empty).
// Bags start at ``offsets`` (the embedding_bag layout; the last runs to the end). The row
// gradients go to the first U rows of ``arena`` when it has them (no fresh pages).
std::vector<at::Tensor> bag_backward(at::Tensor grad, at::Tensor table, at::Tensor ids,
                                     at::Tensor weights, at::Tensor offsets, bool weight_grad,
                                     at::Tensor arena) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "bag_backward: fp32 output gradients and weights");
  TORCH_CHECK(grad.stride(1) == 1 && table.stride(1) == 1, "bag_backward: contiguous rows");
  ids = ids.reshape(-1).to(at::kLong).contiguous();
  offsets = offsets.reshape(-1).to(at::kLong).contiguous();
  weights = weights.reshape(-1).contiguous();
  const int64_t n_hits = ids.numel(), dim = table.size(1), n_bags = offsets.numel();
  auto bags = at::empty({n_hits}, ids.options());  // the bag of every hit
  {
    const int64_t* off = offsets.data_ptr<int64_t>();
    int64_t* bag = bags.data_ptr<int64_t>();
    for (int64_t b = 0; b < n_bags; ++b) {
      const int64_t end = b + 1 < n_bags ? off[b + 1] : n_hits;
      for (int64_t i = off[b]; i < end; ++i) bag[i] = b;
    }
  }
  const int64_t* id = ids.data_ptr<int64_t>();
  auto order = at::empty({n_hits}, ids.options());
  int64_t* ord = order.data_ptr<int64_t>();
  sort_hits_by_id(id, n_hits, ord);
  std::vector<int64_t> unique_ids, starts;
  for (int64_t j = 0; j < n_hits; ++j) {
    if (j == 0 || id[ord[j]] != id[ord[j - 1]]) {
      unique_ids.push_back(id[ord[j]]);
      starts.push_back(j);
    }
  }
  starts.push_back(n_hits);
  const int64_t n_unique = static_cast<int64_t>(unique_ids.size());
  auto unique = at::empty({n_unique}, ids.options());
  std::copy(unique_ids.begin(), unique_ids.end(), unique.data_ptr<int64_t>());
  TORCH_CHECK(arena.scalar_type() == at::kFloat && arena.is_contiguous() &&
              (arena.numel() == 0 || arena.size(1) == dim), "bag_backward: fp32 [*, d] arena");
  const bool fits = arena.numel() && arena.size(0) >= n_unique;
  auto rows = fits ? arena.narrow(0, 0, n_unique) : at::empty({n_unique, dim}, grad.options());
  auto grad_w = at::empty({weight_grad ? n_hits : 0}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, table.scalar_type(), "bag_backward", [&] {
    backward_rows<scalar_t>(grad.data_ptr<float>(), grad.stride(0),
                            table.data_ptr<scalar_t>(), table.stride(0), ord, starts.data(),
                            unique.data_ptr<int64_t>(), bags.data_ptr<int64_t>(),
                            weights.data_ptr<float>(), n_unique, dim, weight_grad,
                            rows.data_ptr<float>(), grad_w.data_ptr<float>());
  });
  return {unique, rows, grad_w};
}

// SparseRowOptimizer's update of rows ``ids`` (unique) of ``weight`` [N, d] (fp32, or bf16 with
// ``round_keys`` [U]: counter_rng row keys for stochastic rounding, columns from ``col_start``)
// with fp32 ``grad`` [U, d], in place. State, as the mode has it (empty tensors otherwise):
// ``exp_avg`` [N, d] fp32/bf16, ``exp_avg_sq`` [N, d] fp32 (adam) or [N] (row-wise modes; the
// Adagrad sum), ``last_step`` [N] int64. ``decay`` [U] fp32 per-row factors, or empty with
// ``scalar_decay`` (1 = no decay).
void sparse_update(const std::string& mode_name, at::Tensor weight, at::Tensor ids,
                   at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                   at::Tensor last_step, at::Tensor decay, double scalar_decay, double beta1,
                   double beta2, double eps, double step_size, int64_t step,
                   at::Tensor round_keys, int64_t col_start) {
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK(weight.is_contiguous() && grad.is_contiguous() && ids.is_contiguous() &&
              grad.scalar_type() == at::kFloat && ids.scalar_type() == at::kLong,
              "sparse_update: contiguous weight, fp32 grad [U, d], int64 ids");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || round_keys.numel() == ids.numel(),
              "sparse_update: a bf16 table needs one rounding key per row");
  const int64_t n = ids.numel(), dim = weight.size(1);
  const bool per_row_decay = decay.numel() > 0;
  const bool has_decay = per_row_decay || scalar_decay != 1.0;
  const Scalars s{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                  static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                  static_cast<float>(-step_size), beta2, step};
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* g = grad.data_ptr<float>();
  const float* dec = per_row_decay ? decay.data_ptr<float>() : nullptr;
  const int64_t* keys = round_keys.numel() ? round_keys.data_ptr<int64_t>() : nullptr;
  float* v = exp_avg_sq.numel() ? exp_avg_sq.data_ptr<float>() : nullptr;
  int64_t* last = last_step.numel() ? last_step.data_ptr<int64_t>() : nullptr;
  const bool rowwise_v = mode != Mode::kAdam;
  auto run_mode = [&](auto mode_tag, auto* w, auto* m) {
    constexpr Mode kMode = decltype(mode_tag)::value;
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = id[r];
        if (r + kAhead < end) {  // random rows: start the next row's loads early
          const int64_t next = id[r + kAhead] * dim;
          prefetch_row(w + next, dim * sizeof(*w));
          if (m) prefetch_row(m + next, dim * sizeof(*m));
          if (v && !rowwise_v) prefetch_row(v + next, dim * sizeof(float));
          if (v && rowwise_v) __builtin_prefetch(v + id[r + kAhead]);
          if (last) __builtin_prefetch(last + id[r + kAhead]);
        }
        update_row<kMode>(w + i * dim, g + r * dim, dim, m ? m + i * dim : m,
                   rowwise_v || !v ? nullptr : v + i * dim, rowwise_v && v ? v + i : nullptr,
                   last ? last + i : nullptr,
                   per_row_decay ? dec[r] : static_cast<float>(scalar_decay), has_decay, s,
                   keys ? keys + r : nullptr, col_start);
      }
    });
  };
  auto run = [&](auto* w, auto* m) {
    switch (mode) {
      case Mode::kAdam: return run_mode(std::integral_constant<Mode, Mode::kAdam>{}, w, m);
      case Mode::kAdamRowwiseV:
        return run_mode(std::integral_constant<Mode, Mode::kAdamRowwiseV>{}, w, m);
      case Mode::kRowwiseAdagrad:
        return run_mode(std::integral_constant<Mode, Mode::kRowwiseAdagrad>{}, w, m);
      case Mode::kAdamB1ZeroRowwise:
        return run_mode(std::integral_constant<Mode, Mode::kAdamB1ZeroRowwise>{}, w, m);
    }
  };
  const bool bf16_rows = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_rows || weight.scalar_type() == at::kFloat, "sparse_update: fp32 or bf16 rows");
  if (exp_avg.numel() && exp_avg.scalar_type() == at::kBFloat16) {
    auto* m = exp_avg.data_ptr<at::BFloat16>();
    bf16_rows ? run(weight.data_ptr<at::BFloat16>(), m) : run(weight.data_ptr<float>(), m);
  } else {
    float* m = exp_avg.numel() ? exp_avg.data_ptr<float>() : nullptr;
    bf16_rows ? run(weight.data_ptr<at::BFloat16>(), m) : run(weight.data_ptr<float>(), m);
  }
}

// counter_rng.normal into ``weight`` [R, n] (fp32 or bf16, rows of unit-stride columns):
// global rows row_start ..., columns col_start ..., N(0, -neg_two_var / 2), the row keys from
// the stream bases of counters 0 and 1. Rows are split over torch's intra-op threads.
void init_normal(at::Tensor weight, int64_t row_start, int64_t col_start, int64_t base1,
                 int64_t base2, double neg_two_var) {
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.dim() == 2 && (bf16 || weight.scalar_type() == at::kFloat) &&
              (weight.size(1) <= 1 || weight.stride(1) == 1),
              "init_normal: fp32 or bf16 [R, n] with unit-stride columns");
  const int64_t n_rows = weight.size(0), n_cols = weight.size(1), stride = weight.stride(0);
  if (n_rows == 0 || n_cols == 0) return;
  void* out = weight.data_ptr();
  char* bytes = static_cast<char*>(out);
  const int64_t elem_bytes = bf16 ? 2 : 4, row_bytes = stride * elem_bytes;
  const int64_t block = std::max<int64_t>(1, kPopulateBytes / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / n_cols), [&](int64_t begin,
                                                                          int64_t end) {
    std::vector<float> buffer(n_cols + 2);
    for (int64_t b = begin; b < end; b += block) {
      const int64_t e = std::min(end, b + block);
      populate(bytes + b * row_bytes, bytes + (e - 1) * row_bytes + n_cols * elem_bytes);
      normal_rows(out, bf16, stride, b, e, row_start, col_start, n_cols,
                  static_cast<uint32_t>(base1), static_cast<uint32_t>(base2),
                  static_cast<float>(neg_two_var), buffer.data());
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bag_backward", &bag_backward, "sparse backward of the weighted bag gather");
  m.def("sparse_update", &sparse_update, "sparse row optimizer update, in place");
  m.def("init_normal", &init_normal, "counter-based N(0, var) rows, in place");
}
