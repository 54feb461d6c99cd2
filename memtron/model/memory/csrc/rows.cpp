// CPU kernels for value tables (memtron.model.memory.cpu_kernels): the sparse backward of the
// weighted bag gather in one pass over the distinct rows, as the Triton kernel does on a GPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace {

template <typename T>
inline float as_float(T x) { return static_cast<float>(x); }

constexpr int64_t kAhead = 4;  // distinct rows whose table row is prefetched ahead

// One distinct row u: rows[u] = sum_j w[j] * grad[bag[j]]; with weight_grad also
// grad_w[hit j] = <grad[bag[j]], table[id]>, the table row read once for all its hits.
template <typename T>
void backward_rows(const float* grad, int64_t grad_stride, const T* table, int64_t table_stride,
                   const int64_t* order, const int64_t* starts, const int64_t* unique,
                   const int64_t* bags, const float* weights, int64_t n_unique, int64_t dim,
                   bool weight_grad, float* rows, float* grad_w) {
  at::parallel_for(0, n_unique, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> value(weight_grad ? dim : 0);
    for (int64_t u = begin; u < end; ++u) {
      float* acc = rows + u * dim;
      std::fill(acc, acc + dim, 0.0f);
      if (weight_grad && u + kAhead < end) {  // random rows: start the next loads early
        const char* next =
            reinterpret_cast<const char*>(table + unique[u + kAhead] * table_stride);
        for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64)
          __builtin_prefetch(next + b);
      }
      if (weight_grad) {
        const T* src = table + unique[u] * table_stride;
        for (int64_t c = 0; c < dim; ++c) value[c] = as_float(src[c]);
      }
      for (int64_t j = starts[u]; j < starts[u + 1]; ++j) {
        const int64_t hit = order[j];
        const float* g = grad + bags[hit] * grad_stride;
        const float w = weights[hit];
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) acc[c] += w * g[c];
        if (weight_grad) {
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < dim; ++c) dot += g[c] * value[c];
          grad_w[hit] = dot;
        }
      }
    }
  });
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
  // hits sorted by (id, hit): a single-threaded sort of packed pairs
  std::vector<std::pair<int64_t, int64_t>> keyed(n_hits);
  for (int64_t i = 0; i < n_hits; ++i) keyed[i] = {id[i], i};
  std::sort(keyed.begin(), keyed.end());
  auto order = at::empty({n_hits}, ids.options());
  int64_t* ord = order.data_ptr<int64_t>();
  std::vector<int64_t> unique_ids, starts;
  for (int64_t j = 0; j < n_hits; ++j) {
    ord[j] = keyed[j].second;
    if (j == 0 || keyed[j].first != keyed[j - 1].first) {
      unique_ids.push_back(keyed[j].first);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bag_backward", &bag_backward, "sparse backward of the weighted bag gather");
}
