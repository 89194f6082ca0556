// Integer matmuls of tursi.engine.quantize's QuantLinear (quantized.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

// y = x W^T (+ bias) with W int8 per output channel (packed int8, with its correction) or
// 4-bit in groups of 32 (packed uint8 nibbles, float16 step and minimum per group), x
// quantized per row to int8 (dynamic: from its own peak; static: input_scale, one float,
// widened for a row beyond it): QuantLinear's torch reference, bit for bit. x: float32
// [..., in]; returns float32 [..., out]. What a layer does not have is an empty tensor.
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale, const at::Tensor& correction,
                            const at::Tensor& groups, const at::Tensor& input_scale,
                            const c10::optional<at::Tensor>& bias);

// "avx512-vnni" where this CPU runs the vector kernels, else "scalar".
std::string quantized_isa();
