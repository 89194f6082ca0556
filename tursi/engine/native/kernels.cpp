// C++ for Tursi's decode step (tursi/engine/decode.py): one token per row, or a few (a verify
// pass of speculative decoding).
//
// decode_layers runs a fused Llama's decoder layers with no Python between the ops: the
// packed matmuls (oneDNN), SDPA and SiLU are torch's own ops; two fused kernels do, in one
// call each, what the step otherwise does with several small torch ops, rounding where those
// ops round, so a bfloat16 result matches transformers' Llama code:
// - add_rms_norm: the residual add, then LlamaRMSNorm (normalized in float32, rounded to the
//   input dtype, then times the weight);
// - rope_store: the rotary embedding of q and k (x * cos + rotate_half(x) * sin), with the
//   new keys and values written into the KV cache at each token's own position.
// The tokens are few (one or a few per running request), so these two loops are
// single-threaded.
// A quantized model's linears run quantized.cpp's integer kernels instead of oneDNN's.
#include <torch/extension.h>

#include "quantized.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float wide(T x) {
  return static_cast<float>(x);
}

// x rounded to T's precision, back as float: where a torch op would store a T.
template <typename T>
inline float rounded(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// sum = hidden + delta (when delta is given; else sum is hidden), out = the norm of sum.
template <typename T>
void add_rms_norm_rows(const T* hidden, const T* delta, T* sum, const T* weight, T* out,
                       int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* h = hidden + r * dim;
    if (delta != nullptr) {
      const T* d = delta + r * dim;
      T* s = sum + r * dim;
      for (int64_t j = 0; j < dim; ++j) s[j] = static_cast<T>(wide(h[j]) + wide(d[j]));
      h = s;
    }
    double squares = 0.0;
    for (int64_t j = 0; j < dim; ++j) {
      const float x = wide(h[j]);
      squares += static_cast<double>(x * x);
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(squares / dim) + eps);
    T* o = out + r * dim;
    for (int64_t j = 0; j < dim; ++j) {
      o[j] = static_cast<T>(wide(weight[j]) * rounded<T>(wide(h[j]) * scale));
    }
  }
}

// Token t = r * width + i is row r's i-th new token, at column positions[t] of row r; q_out is
// [rows, heads, width, head_dim].
template <typename T>
void rope_store_rows(const T* qkv, const T* cos, const T* sin, const int64_t* positions,
                     T* q_out, T* keys, T* values, int64_t rows, int64_t width, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int64_t capacity) {
  const int64_t half = head_dim / 2;
  const int64_t features = (heads + 2 * kv_heads) * head_dim;
  for (int64_t t = 0; t < rows * width; ++t) {
    const int64_t r = t / width, i = t % width;
    const T* row = qkv + t * features;
    const T* c = cos + t * head_dim;
    const T* s = sin + t * head_dim;
    const int64_t column = positions[t];
    for (int64_t h = 0; h < heads + kv_heads; ++h) {  // q heads, then k heads: rotated
      const T* x = row + h * head_dim;
      T* o = h < heads ? q_out + ((r * heads + h) * width + i) * head_dim
                       : keys + ((r * kv_heads + h - heads) * capacity + column) * head_dim;
      for (int64_t j = 0; j < head_dim; ++j) {
        const float turned = j < half ? -wide(x[j + half]) : wide(x[j - half]);
        o[j] = static_cast<T>(rounded<T>(wide(x[j]) * wide(c[j])) +
                              rounded<T>(turned * wide(s[j])));
      }
    }
    for (int64_t h = 0; h < kv_heads; ++h) {  // v heads: copied
      const T* x = row + (heads + kv_heads + h) * head_dim;
      std::copy(x, x + head_dim, values + ((r * kv_heads + h) * capacity + column) * head_dim);
    }
  }
}

void check_float(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has another dtype");
}

}  // namespace

// (hidden + delta, rms_norm(hidden + delta) * weight); without delta, hidden itself comes back.
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& hidden,
                                        const c10::optional<torch::Tensor>& delta,
                                        const torch::Tensor& weight, double eps) {
  check_float(hidden, hidden, "hidden");
  check_float(weight, hidden, "weight");
  TORCH_CHECK(hidden.dim() > 0 && hidden.size(-1) > 0, "hidden must not be empty");
  const int64_t dim = hidden.size(-1);
  TORCH_CHECK(weight.numel() == dim, "weight must have ", dim, " elements");
  torch::Tensor sum = hidden;
  if (delta.has_value()) {
    check_float(*delta, hidden, "delta");
    TORCH_CHECK(delta->sizes() == hidden.sizes(), "delta must have hidden's shape");
    sum = torch::empty_like(hidden);
  }
  torch::Tensor out = torch::empty_like(hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "add_rms_norm",
                                  [&] {
    add_rms_norm_rows<scalar_t>(hidden.data_ptr<scalar_t>(),
                                delta.has_value() ? delta->data_ptr<scalar_t>() : nullptr,
                                sum.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(),
                                hidden.numel() / dim, dim, static_cast<float>(eps));
  });
  return {sum, out};
}

// qkv [rows, width, (heads + 2 kv_heads) * head_dim] -> q [rows, heads, width, head_dim],
// rotated; k (rotated) and v written to keys/values [>= rows, kv_heads, capacity, head_dim]:
// row r's token i at column positions[r * width + i] of row r. cos, sin: [rows, width,
// head_dim].
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos,
                         const torch::Tensor& sin, const torch::Tensor& positions,
                         const torch::Tensor& keys, const torch::Tensor& values, int64_t heads,
                         int64_t kv_heads) {
  check_float(qkv, qkv, "qkv");
  for (const auto* t : {&cos, &sin, &keys, &values}) check_float(*t, qkv, "cos, sin, keys, values");
  TORCH_CHECK(positions.device().is_cpu() && positions.is_contiguous() &&
                  positions.scalar_type() == torch::kLong && positions.dim() == 1,
              "positions must be a contiguous CPU int64 vector");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(), "keys, values: 4-D, same shape");
  TORCH_CHECK(qkv.dim() == 3, "qkv must be [rows, width, features]");
  const int64_t rows = qkv.size(0), width = qkv.size(1), tokens = rows * width;
  const int64_t head_dim = keys.size(3), capacity = keys.size(2);
  TORCH_CHECK(heads > 0 && keys.size(1) == kv_heads && rows <= keys.size(0) &&
                  head_dim % 2 == 0,
              "keys do not fit");
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * head_dim, "qkv does not fit");
  TORCH_CHECK(positions.size(0) == tokens, "positions: one per row and token");
  TORCH_CHECK(cos.numel() == tokens * head_dim && sin.numel() == tokens * head_dim,
              "cos, sin do not fit");
  const int64_t* column = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(column[t] >= 0 && column[t] < capacity, "position outside the cache");
  }
  torch::Tensor q = torch::empty({rows, heads, width, head_dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_store", [&] {
    rope_store_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                              sin.data_ptr<scalar_t>(), column, q.data_ptr<scalar_t>(),
                              keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), rows, width,
                              heads, kv_heads, head_dim, capacity);
  });
  return q;
}

namespace {

// torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""): tursi.engine.cpu_kernels'
// PackedLinear.
at::Tensor packed_linear(const c10::OperatorHandle& op, const at::Tensor& x,
                         const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// Linear `index` of the step: packed (oneDNN) when `quantized` is empty, else the integer
// kernel with that linear's scale, correction, groups and input scale.
at::Tensor project(const c10::OperatorHandle& op, const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias,
                   const std::vector<std::vector<at::Tensor>>& quantized, int64_t index) {
  if (quantized.empty()) return packed_linear(op, x, weight, bias);
  const std::vector<at::Tensor>& q = quantized[index];
  return quantized_linear(x, weight, q[0], q[1], q[2], q[3], bias);
}

}  // namespace

// The decoder layers of a fused Llama (tursi.engine.cpu_kernels) for `width` tokens per row
// (hidden [rows, width, hidden]; positions [rows * width], cos and sin [rows, width, head_dim],
// mask [rows, 1, width, window]): what tursi.engine.decode's torch loop does, op for op,
// without Python between the ops. Per layer
// i, weights[6i..6i+5] = input norm, packed qkv, packed o, post-attention norm, packed
// gate_up, packed down, and biases[4i..4i+3] those of qkv, o, gate_up, down; weights' last
// entry is the final norm. A quantized model's weights[] hold its packed integer weights and
// quantized[4i..4i+3] the rest of each linear (scale, correction, groups, input scale);
// a float model's quantized is empty. Returns the final norm of the last hidden state
// [rows, width, hidden].
at::Tensor decode_layers(const at::Tensor& hidden, const std::vector<at::Tensor>& weights,
                         const std::vector<c10::optional<at::Tensor>>& biases,
                         const std::vector<std::vector<at::Tensor>>& quantized,
                         const std::vector<at::Tensor>& keys,
                         const std::vector<at::Tensor>& values, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& positions,
                         const at::Tensor& mask, int64_t window, int64_t heads, int64_t kv_heads,
                         int64_t intermediate, double scaling, double eps) {
  const auto layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == 6 * layers + 1 &&
                  static_cast<int64_t>(biases.size()) == 4 * layers,
              "decode_layers: 6 weights and 4 biases per layer, and the final norm");
  TORCH_CHECK(quantized.empty() || static_cast<int64_t>(quantized.size()) == 4 * layers,
              "decode_layers: no quantized linears, or 4 per layer");
  for (const auto& q : quantized) {
    TORCH_CHECK(q.size() == 4, "decode_layers: a quantized linear has 4 more tensors");
  }
  // Looked up once per process, not once per step.
  static const c10::OperatorHandle linear = c10::Dispatcher::singleton().findSchemaOrThrow(
      "mkldnn::_linear_pointwise", "");
  TORCH_CHECK(hidden.dim() == 3, "decode_layers: hidden must be [rows, width, hidden]");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  TORCH_CHECK(rows > 0 && width > 0 && window > 0, "decode_layers: no rows");
  auto state = add_rms_norm(hidden, c10::nullopt, weights[0], eps);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = &weights[6 * i];
    const c10::optional<at::Tensor>* b = &biases[4 * i];
    at::Tensor q = rope_store(project(linear, state[1], w[1], b[0], quantized, 4 * i), cos, sin,
                              positions, keys[i], values[i], heads, kv_heads);
    TORCH_CHECK(window <= keys[i].size(2), "decode_layers: window past the cache");
    at::Tensor out = at::scaled_dot_product_attention(
        q, keys[i].narrow(0, 0, rows).narrow(2, 0, window),
        values[i].narrow(0, 0, rows).narrow(2, 0, window), mask, 0.0, false, scaling,
        heads != kv_heads);
    at::Tensor attended = project(linear, out.transpose(1, 2).reshape({rows, width, -1}), w[2],
                                  b[1], quantized, 4 * i + 1);
    state = add_rms_norm(state[0], attended, w[3], eps);
    at::Tensor gate_up = project(linear, state[1], w[4], b[2], quantized, 4 * i + 2);
    at::Tensor act = at::silu(gate_up.narrow(-1, 0, intermediate))
                         .mul_(gate_up.narrow(-1, intermediate, intermediate));
    const at::Tensor& following = i + 1 < layers ? weights[6 * (i + 1)] : weights[6 * layers];
    state = add_rms_norm(state[0], project(linear, act, w[5], b[3], quantized, 4 * i + 3),
                         following, eps);
  }
  return state[1];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("VERSION") = 3;
  m.def("add_rms_norm", &add_rms_norm, "residual add + LlamaRMSNorm");
  m.def("rope_store", &rope_store, "rotary embedding of q, k; k and v into the KV cache");
  // The GIL is released for the whole step: the server's other threads run meanwhile.
  m.def("decode_layers", &decode_layers, "a fused Llama's decoder layers, a few tokens per row",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantized_linear", &quantized_linear, "x W^T + b with int8 or int4 weights",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantized_isa", &quantized_isa, "the instruction set of quantized_linear here");
}
