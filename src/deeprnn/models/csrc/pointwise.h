// Scalar pointwise functions shared by the compiled kernels (windows.cpp, greedy.cpp), written so that the
// loops calling them vectorise: no library call per element, no branches.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

// The inner loops over units write arrays that never overlap what they read at another unit; saying
// so spares the compiler run-time overlap checks, which it gives up on past ~10 pointers (the LSTM
// backward step has more) and then leaves the loop scalar.
#if defined(__clang__)
#define UNITS_INDEPENDENT _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define UNITS_INDEPENDENT _Pragma("GCC ivdep")
#else
#define UNITS_INDEPENDENT
#endif

namespace deeprnn {

// The bits of a value as another type of the same size. C++20's bit_cast would do, but older torch
// releases build extensions as C++17; compilers turn the memcpy into a register move, so loops vectorise.
template <typename To, typename From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// exp for float in a form the compiler vectorises (std::exp stays a library call per element):
// exp(x) = 2^n exp(r) with n = round(x / ln 2), |r| <= ln 2 / 2, and Cephes' degree-6 polynomial for
// exp(r), good to about 1 ulp. x is clamped so that 2^n stays a normal float; the sigmoid saturates
// long before either bound. NaN passes through.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Adding and subtracting 1.5 * 2^23 rounds to an integer without a nearbyint call.
  const float shift = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693359375f;  // ln 2 in two parts, so r keeps its low bits
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_as<float>(scale);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_vec(-x)); }

// float64 is the tests' dtype, where agreement with torch's sigmoid matters more than speed.
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh for float in a form the compiler vectorises: 2σ(2x) − 1, one transcendental function shared with the
// sigmoid, except near 0, where that form cancels (an absolute error of about an ulp of 1 left 1e-4 with a
// relative error of 2e-4, and 3e-8 as 0): there tanh's Taylor series to x^9, whose next term is below
// 1e-8 of tanh for |x| < 1/4. Both are computed and one is picked, without a branch; NaN takes the first.
inline float tanh_vec(float x) {
  const float via_sigmoid = sigmoid(x * 2.0f) * 2.0f - 1.0f;
  const float x2 = x * x;
  const float series =
      x + x * x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835))));
  return std::abs(x) < 0.25f ? series : via_sigmoid;
}

// float64 is the tests' dtype, where agreement with torch's tanh matters more than speed.
inline double tanh_vec(double x) { return std::tanh(x); }

enum class Cell { kLSTM, kGRU, kTanh, kReLU, kUnknown };

// The cell of torch.nn's name for it ("lstm", "gru", "rnn_tanh", "rnn_relu"), kUnknown for any other.
inline Cell cell_named(const std::string& name) {
  if (name == "lstm") return Cell::kLSTM;
  if (name == "gru") return Cell::kGRU;
  if (name == "rnn_tanh") return Cell::kTanh;
  if (name == "rnn_relu") return Cell::kReLU;
  return Cell::kUnknown;
}

inline int gates_of(Cell cell) { return cell == Cell::kLSTM ? 4 : cell == Cell::kGRU ? 3 : 1; }

// One step's pointwise pass of a cell over u units, as torch.lstm_cell / gru_cell / rnn_*_cell compute it:
// gi = x W_ih^T + b_ih and gh = h_prev W_hh^T + b_hh, gate blocks of u (i, f, g, o; r, z, n). Writes the new
// h, and for the LSTM the new c from c_prev (c may be c_prev: each unit reads its own before writing it).
inline void cell_step(Cell cell, int64_t u, const float* __restrict gi, const float* __restrict gh,
                      const float* __restrict h_prev, const float* c_prev, float* c, float* __restrict h) {
  switch (cell) {
    case Cell::kLSTM: {
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < u; ++j) {
        const float i = sigmoid(gi[j] + gh[j]);
        const float f = sigmoid(gi[u + j] + gh[u + j]);
        const float g = tanh_vec(gi[2 * u + j] + gh[2 * u + j]);
        const float o = sigmoid(gi[3 * u + j] + gh[3 * u + j]);
        const float cn = f * c_prev[j] + i * g;
        c[j] = cn;
        h[j] = o * tanh_vec(cn);
      }
      break;
    }
    case Cell::kGRU: {  // r multiplies only W_hn h + b_hn
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < u; ++j) {
        const float r = sigmoid(gi[j] + gh[j]);
        const float z = sigmoid(gi[u + j] + gh[u + j]);
        const float n = tanh_vec(gi[2 * u + j] + r * gh[2 * u + j]);
        h[j] = n + z * (h_prev[j] - n);
      }
      break;
    }
    case Cell::kTanh: {
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < u; ++j) h[j] = tanh_vec(gi[j] + gh[j]);
      break;
    }
    case Cell::kReLU: {
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < u; ++j) h[j] = std::max(gi[j] + gh[j], 0.0f);
      break;
    }
    case Cell::kUnknown:
      break;
  }
}

}  // namespace deeprnn
