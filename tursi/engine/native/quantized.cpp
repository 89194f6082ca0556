// Integer matmuls for quantized loads (tursi.engine.quantize.QuantLinear), one kernel for
// every row count (a decode step's 1-32 rows, a prefill's hundreds).
//
// Activations: each row quantized to int8, q = clamp(round(x / s), -127, 127) with s its own
// peak / 127 (dynamic) or a calibrated constant widened to that peak / 127 when the row goes
// beyond it (static). vpdpbusd multiplies unsigned by signed bytes, four products summed into
// an int32 lane.
// Weights, in blocks of 16 output channels (docs/quantization.md has the layout):
// - 8-bit: int8 [blocks, in/4, 16 x 4]: for each 4 inputs, the 16 channels' 4 bytes. The
//   activations are stored as q + 128 (the unsigned operand) and acc = sum_k (q_x + 128) w_k -
//   correction, correction = 128 * sum_k w_k: the exact integer sum_k q_x w_k, which wraps
//   correctly in int32 as long as the true sum fits. y = float(acc) * (s * scale) + bias.
// - 4-bit: uint8 [blocks, in/32, 4, 64]: per group of 32 inputs, 4 vectors whose low nibbles
//   (0..15, the unsigned operand) hold inputs 8j..8j+3 and high nibbles 8j+4..8j+7 of the
//   group, and each channel's float16 step d and minimum m per group ([blocks, groups, 2,
//   16]). The activations are signed; each group's exact int32 sum acc_g is scaled and added
//   in float32, group after group: y = (sum_g float(acc_g) d_g + sum_x(g) m_g) * (s * scale)
//   + bias.
// Every value is rounded where the torch reference rounds (QuantLinear.reference).
//
// The vector kernels need AVX-512 BW and VNNI, checked at run time (the build has no
// -march=native); elsewhere the scalar loops compute the same integers.
#include "quantized.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int64_t kBlock = 16;  // output channels per block
constexpr int64_t kGroup = 32;  // inputs per 4-bit group

// TURSI_QUANTIZED_SCALAR=1 runs the scalar loops on any CPU (tested: they give the same bits).
bool has_vnni() {
  static const bool supported =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni") && std::getenv("TURSI_QUANTIZED_SCALAR") == nullptr;
  return supported;
}

struct Problem {
  const uint8_t* xq;  // [rows, padded] activations (+ 128 for 8-bit)
  const float* xsum;  // 4-bit: [rows, groups] each group's sum of activations
  const float* xscale;  // [rows]
  int64_t rows, padded, blocks, out;
  const int8_t* w8;  // 8-bit weights, or nullptr
  const uint8_t* w4;  // 4-bit weights, or nullptr
  const uint16_t* params;  // 4-bit: float16 step and minimum [blocks, groups, 2, 16]
  int64_t groups;
  const int32_t* correction;  // 8-bit: [blocks * 16]
  const float* scale;  // [out]
  const float* bias;  // [out] or nullptr
  float* y;  // [rows, out]
};

// --- activations ---------------------------------------------------------------------------

// A row's step from its peak: peak / 127 (dynamic), or the calibrated step unless the peak
// goes beyond it (static).
float step_of(float peak, float fixed) {
  return fixed > 0 ? std::max(fixed, peak / 127.0f) : std::max(peak, 1e-8f) / 127.0f;
}

void quantize_rows_scalar(const float* x, int64_t rows, int64_t in, int64_t padded, float fixed,
                          int offset, uint8_t* xq, float* xs) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in;
    float peak = 0.0f;
    for (int64_t k = 0; k < in; ++k) peak = std::max(peak, std::fabs(row[k]));
    const float s = step_of(peak, fixed);
    uint8_t* q = xq + r * padded;
    for (int64_t k = 0; k < in; ++k) {
      const float v = std::min(std::max(std::nearbyint(row[k] / s), -127.0f), 127.0f);
      q[k] = static_cast<uint8_t>(static_cast<int>(v) + offset);
    }
    std::fill(q + in, q + padded, static_cast<uint8_t>(offset));
    xs[r] = s;
  }
}

// 4-bit: each group's sum of a row's (signed) activations, exact in float32.
void group_sums(const uint8_t* xq, int64_t rows, int64_t padded, float* sums) {
  const int64_t groups = padded / kGroup;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* q = reinterpret_cast<const int8_t*>(xq + r * padded);
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = 0; k < kGroup; ++k) sum += q[g * kGroup + k];
      sums[r * groups + g] = static_cast<float>(sum);
    }
  }
}

__attribute__((target("avx512f,avx512bw"))) void quantize_rows_avx512(
    const float* x, int64_t rows, int64_t in, int64_t padded, float fixed, int shift,
    uint8_t* xq, float* xs) {
  const __m512 low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  const __m512i offset = _mm512_set1_epi32(shift);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 mask = in - k >= 16 ? 0xFFFF : (1u << (in - k)) - 1;
      peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + k)));
    }
    const float s = step_of(_mm512_reduce_max_ps(peak), fixed);
    const __m512 divisor = _mm512_set1_ps(s);
    uint8_t* q = xq + r * padded;
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 mask = in - k >= 16 ? 0xFFFF : (1u << (in - k)) - 1;
      __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), divisor);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, low), high);
      const __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), offset);
      _mm512_mask_cvtepi32_storeu_epi8(q + k, mask, i);
    }
    std::fill(q + in, q + padded, static_cast<uint8_t>(shift));
    xs[r] = s;
  }
}

// --- scalar kernels ------------------------------------------------------------------------

void store_scalar(const Problem& p, int64_t r, int64_t o, float acc) {
  const float factor = p.xscale[r] * p.scale[o];
  float v = acc * factor;
  if (p.bias != nullptr) v = v + p.bias[o];
  p.y[r * p.out + o] = v;
}

float half_to_float(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

void scalar_block(const Problem& p, int64_t b) {
  const int64_t steps = p.padded / 4;
  for (int64_t r = 0; r < p.rows; ++r) {
    const uint8_t* x = p.xq + r * p.padded;
    const int8_t* signed_x = reinterpret_cast<const int8_t*>(x);
    for (int64_t lane = 0; lane < kBlock && b * kBlock + lane < p.out; ++lane) {
      if (p.w8 != nullptr) {
        int64_t acc = 0;
        const int8_t* w = p.w8 + b * steps * 64 + lane * 4;
        for (int64_t s = 0; s < steps; ++s) {
          for (int64_t j = 0; j < 4; ++j) acc += int64_t{x[s * 4 + j]} * w[s * 64 + j];
        }
        acc -= p.correction[b * kBlock + lane];
        const int32_t exact = static_cast<int32_t>(static_cast<uint32_t>(acc));  // int32 wrap
        store_scalar(p, r, b * kBlock + lane, static_cast<float>(exact));
        continue;
      }
      float acc = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const uint8_t* w = p.w4 + (b * p.groups + g) * 256 + lane * 4;
        int32_t part = 0;
        for (int64_t v = 0; v < 4; ++v) {
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t byte = w[v * 64 + j];
            const int64_t k = g * kGroup + v * 8 + j;
            part += int32_t{signed_x[k]} * (byte & 0x0F);
            part += int32_t{signed_x[k + 4]} * (byte >> 4);
          }
        }
        const uint16_t* params = p.params + (b * p.groups + g) * 2 * kBlock;
        acc = acc + static_cast<float>(part) * half_to_float(params[lane]);
        acc = acc + p.xsum[r * p.groups + g] * half_to_float(params[kBlock + lane]);
      }
      store_scalar(p, r, b * kBlock + lane, acc);
    }
  }
}

// --- AVX-512 VNNI kernels ------------------------------------------------------------------

#define TURSI_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline

TURSI_VNNI __m512i broadcast4(const uint8_t* x) {
  int32_t word;
  std::memcpy(&word, x, 4);
  return _mm512_set1_epi32(word);
}

// The 16 outputs of block b for row r: acc * (s * scale) + bias.
TURSI_VNNI void store_block(const Problem& p, int64_t r, int64_t b, __m512 acc) {
  const int64_t o = b * kBlock;
  const __mmask16 mask = p.out - o >= kBlock ? 0xFFFF : (1u << (p.out - o)) - 1;
  const __m512 factor =
      _mm512_mul_ps(_mm512_set1_ps(p.xscale[r]), _mm512_maskz_loadu_ps(mask, p.scale + o));
  __m512 v = _mm512_mul_ps(acc, factor);
  if (p.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + o));
  _mm512_mask_storeu_ps(p.y + r * p.out + o, mask, v);
}

// Rows r0..r0+R-1 against blocks b0..b0+NB-1, 8-bit weights.
template <int R, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile8(const Problem& p, int64_t b0,
                                                                  int64_t r0) {
  const int64_t steps = p.padded / 4;
  __m512i acc[R][NB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const int8_t* w = p.w8 + b0 * steps * 64;
  const uint8_t* x = p.xq + r0 * p.padded;
  for (int64_t s = 0; s < steps; ++s) {
    __m512i weights[NB];
    for (int j = 0; j < NB; ++j) weights[j] = _mm512_loadu_si512(w + (j * steps + s) * 64);
    for (int i = 0; i < R; ++i) {
      const __m512i xv = broadcast4(x + i * p.padded + s * 4);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, weights[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const __m512i correction = _mm512_loadu_si512(p.correction + (b0 + j) * kBlock);
    for (int i = 0; i < R; ++i) {
      const __m512i exact = _mm512_sub_epi32(acc[i][j], correction);
      store_block(p, r0 + i, b0 + j, _mm512_cvtepi32_ps(exact));
    }
  }
}

// The same with 4-bit weights: each group's exact sum scaled by its step, plus the group's
// activation sum times its minimum, added in float32 group after group.
template <int R, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile4(const Problem& p, int64_t b0,
                                                                  int64_t r0) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][NB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint8_t* x = p.xq + r0 * p.padded;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i part[R][NB];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NB; ++j) part[i][j] = _mm512_setzero_si512();
    for (int v = 0; v < 4; ++v) {
      __m512i lo[NB], hi[NB];
      for (int j = 0; j < NB; ++j) {
        const __m512i packed =
            _mm512_loadu_si512(p.w4 + ((b0 + j) * p.groups + g) * 256 + v * 64);
        lo[j] = _mm512_and_si512(packed, nibble);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      }
      const int64_t k = g * kGroup + v * 8;
      for (int i = 0; i < R; ++i) {
        const __m512i xa = broadcast4(x + i * p.padded + k);
        const __m512i xb = broadcast4(x + i * p.padded + k + 4);
        for (int j = 0; j < NB; ++j) {
          part[i][j] = _mm512_dpbusd_epi32(part[i][j], lo[j], xa);
          part[i][j] = _mm512_dpbusd_epi32(part[i][j], hi[j], xb);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const uint16_t* params = p.params + ((b0 + j) * p.groups + g) * 2 * kBlock;
      const __m512 step =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
      const __m512 minimum =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params + kBlock)));
      for (int i = 0; i < R; ++i) {
        acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_mul_ps(_mm512_cvtepi32_ps(part[i][j]), step));
        const __m512 sum = _mm512_set1_ps(p.xsum[(r0 + i) * p.groups + g]);
        acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_mul_ps(sum, minimum));
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j) store_block(p, r0 + i, b0 + j, acc[i][j]);
}

template <bool Four, int R, int NB>
void tile(const Problem& p, int64_t b0, int64_t r0) {
  if constexpr (Four) {
    tile4<R, NB>(p, b0, r0);
  } else {
    tile8<R, NB>(p, b0, r0);
  }
}

// The last rows (fewer than a full tile) against blocks b0..b0+NB-1.
template <bool Four, int NB, int R>
void tail(const Problem& p, int64_t b0, int64_t r0, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) {
      tile<Four, R, NB>(p, b0, r0);
    } else {
      tail<Four, NB, R - 1>(p, b0, r0, left);
    }
  }
}

// Every row against blocks b0..b0+NB-1, in tiles of as many rows as the registers allow.
template <bool Four, int NB>
void all_rows(const Problem& p, int64_t b0) {
  constexpr int Rows = Four ? (NB >= 4 ? 2 : 4) : (NB >= 4 ? 4 : 8);
  int64_t r = 0;
  for (; r + Rows <= p.rows; r += Rows) tile<Four, Rows, NB>(p, b0, r);
  if (r < p.rows) tail<Four, NB, Rows - 1>(p, b0, r, p.rows - r);
}

// Blocks [begin, end) in units of NB (the last unit may be short: one block at a time).
template <bool Four, int NB>
void vector_blocks(const Problem& p, int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + NB <= end; b += NB) all_rows<Four, NB>(p, b);
  for (; b < end; ++b) all_rows<Four, 1>(p, b);
}

void run(const Problem& p) {
  const bool four = p.w4 != nullptr;
  if (!has_vnni()) {
    at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) scalar_block(p, b);
    });
    return;
  }
  // A few rows: 4 blocks at a time (more weight streams in flight); more rows: 2 blocks and
  // taller row tiles (each weight vector loaded once for more rows).
  const int64_t unit = p.rows <= 2 ? 4 : 2;
  const int64_t units = (p.blocks + unit - 1) / unit;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * unit, last = std::min(end * unit, p.blocks);
    if (unit == 4) {
      four ? vector_blocks<true, 4>(p, first, last) : vector_blocks<false, 4>(p, first, last);
    } else {
      four ? vector_blocks<true, 2>(p, first, last) : vector_blocks<false, 2>(p, first, last);
    }
  });
}

}  // namespace

std::string quantized_isa() { return has_vnni() ? "avx512-vnni" : "scalar"; }

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale, const at::Tensor& correction,
                            const at::Tensor& groups_params, const at::Tensor& input_scale,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() > 0,
              "quantized_linear: x must be a float32 CPU tensor");
  const bool four = packed.scalar_type() == at::kByte;
  TORCH_CHECK(four || packed.scalar_type() == at::kChar,
              "quantized_linear: packed weights are int8 (8-bit) or uint8 (4-bit)");
  TORCH_CHECK(packed.is_contiguous() && packed.dim() == (four ? 4 : 3),
              "quantized_linear: packed weights have the wrong layout");
  const int64_t in = x.size(-1), blocks = packed.size(0);
  const int64_t padded = four ? packed.size(1) * kGroup : packed.size(1) * 4;
  const int64_t out = scale.numel(), groups = four ? packed.size(1) : 0;
  TORCH_CHECK(in > 0 && in <= padded && padded - in < (four ? kGroup : 4),
              "quantized_linear: x has ", in, " features, the weights ", padded);
  TORCH_CHECK(out > 0 && out <= blocks * kBlock && blocks * kBlock - out < kBlock,
              "quantized_linear: ", out, " scales for ", blocks, " blocks");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "quantized_linear: scale must be contiguous float32");
  if (four) {
    TORCH_CHECK(groups_params.scalar_type() == at::kHalf && groups_params.is_contiguous() &&
                    groups_params.numel() == blocks * groups * 2 * kBlock,
                "quantized_linear: 4-bit weights need float16 steps and minimums "
                "[blocks, groups, 2, 16]");
  } else {
    TORCH_CHECK(correction.scalar_type() == at::kInt && correction.is_contiguous() &&
                    correction.numel() == blocks * kBlock,
                "quantized_linear: correction must be int32 [blocks * 16]");
  }
  TORCH_CHECK(input_scale.numel() <= 1 && (input_scale.numel() == 0 ||
                                           input_scale.scalar_type() == at::kFloat),
              "quantized_linear: input_scale is one float32 (static) or empty (dynamic)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out,
                "quantized_linear: bias must be contiguous float32 [out]");
  }
  const float fixed = input_scale.numel() == 1 ? input_scale.item<float>() : 0.0f;
  TORCH_CHECK(input_scale.numel() == 0 || fixed > 0, "quantized_linear: input_scale <= 0");

  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / in;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (rows == 0) return y;
  at::Tensor xq = at::empty({rows, padded}, x.options().dtype(at::kByte));
  at::Tensor xs = at::empty({rows}, x.options());
  const int offset = four ? 0 : 128;  // 8-bit: activations are vpdpbusd's unsigned operand
  if (has_vnni()) {
    quantize_rows_avx512(xc.data_ptr<float>(), rows, in, padded, fixed, offset,
                         xq.data_ptr<uint8_t>(), xs.data_ptr<float>());
  } else {
    quantize_rows_scalar(xc.data_ptr<float>(), rows, in, padded, fixed, offset,
                         xq.data_ptr<uint8_t>(), xs.data_ptr<float>());
  }
  at::Tensor sums;
  if (four) {
    sums = at::empty({rows, groups}, x.options());
    group_sums(xq.data_ptr<uint8_t>(), rows, padded, sums.data_ptr<float>());
  }
  Problem p{};
  p.xq = xq.data_ptr<uint8_t>();
  p.xsum = four ? sums.data_ptr<float>() : nullptr;
  p.xscale = xs.data_ptr<float>();
  p.rows = rows;
  p.padded = padded;
  p.blocks = blocks;
  p.out = out;
  p.w8 = four ? nullptr : packed.data_ptr<int8_t>();
  p.w4 = four ? packed.data_ptr<uint8_t>() : nullptr;
  p.params = four ? reinterpret_cast<const uint16_t*>(groups_params.data_ptr<at::Half>())
                  : nullptr;
  p.groups = groups;
  p.correction = four ? nullptr : correction.data_ptr<int32_t>();
  p.scale = scale.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.y = y.data_ptr<float>();
  run(p);
  return y;
}
