// Compiled window kernels for deeprnn.models.scratch: the forward loop and the backward sweep of
// _LSTMWindow, _GRUWindow and _RNNWindow, with the same math, saved tensors and results as their Python
// loops (which stay the reference and the GPU path).
//
// Why: at the book's size (batch 32, 256 hidden) a step's pointwise work is ~10 small ATen ops whose
// per-call cost (Python, dispatch, allocation) outweighs their arithmetic. Here a step is one ATen
// product (at::mm, or in float32 oneDNN's prepacked linear: see StepProduct) and one pass over the B x H
// units in plain loops the compiler vectorises.
//
// As in scratch.py: time-major (T, B, ...), gates stacked along the last axis (LSTM i, f, g, o; GRU r, z,
// n). scalar_t is the state's dtype (float or double: state, gates and pointwise work); lp_t the dtype
// of the products' operands under autocast (c10::BFloat16 or c10::Half), or scalar_t itself when there
// is no low-precision copy; x_t the input projection's dtype (scalar_t, or lp_t under autocast).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include "pointwise.h"

#include <algorithm>
#include <string>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

using deeprnn::bits_as;
using deeprnn::exp_vec;
using deeprnn::sigmoid;
using deeprnn::tanh_vec;

template <typename scalar_t, typename lp_t>
constexpr bool has_lp = !std::is_same_v<scalar_t, lp_t>;

// Rounding to lp as torch's copy_ does it (double goes through float). For bfloat16 it is
// c10::BFloat16's own round-to-nearest-even, written without a branch so the loops around it vectorise.
template <typename lp_t, typename T>
inline lp_t to_lp(T x) {
  const float v = static_cast<float>(x);
  if constexpr (std::is_same_v<lp_t, c10::BFloat16>) {
    const uint32_t u = bits_as<uint32_t>(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return lp_t(bits, lp_t::from_bits());
  } else {
    return static_cast<lp_t>(v);
  }
}

// x + the step's product h W. When both are lp, torch.add computes the sum in lp, i.e. rounds it to lp
// before it lands in the float gates; the Python kernels inherit that, so this does too.
template <typename scalar_t, typename x_t, typename lp_t>
inline scalar_t add_product(x_t x, lp_t p) {
  if constexpr (std::is_same_v<x_t, lp_t> && has_lp<scalar_t, lp_t>) {
    return static_cast<scalar_t>(static_cast<float>(to_lp<lp_t>(static_cast<float>(x) + static_cast<float>(p))));
  } else {
    return static_cast<scalar_t>(x) + static_cast<scalar_t>(p);
  }
}

// The incoming gradient of h for a backward step: dh_base alone, or dh_base + the previous step's lp
// product (converted to scalar_t first, as `.to(dtype)` and `+=` in the Python sweep). Calls
// body(row b, unit j, dh) for every unit; two loops keep the test out of the vectorised body.
template <typename scalar_t, typename lp_t, typename Body>
inline void for_each_unit(int64_t B, int64_t H, const scalar_t* __restrict dh_base,
                          const lp_t* __restrict dh_prod, Body&& body) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = b * H;
    if (dh_prod != nullptr) {
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < H; ++j) body(b, j, dh_base[s + j] + static_cast<scalar_t>(dh_prod[s + j]));
    } else {
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < H; ++j) body(b, j, dh_base[s + j]);
    }
  }
}

// -- one step of each cell, forward and backward ----------------------------------------------------
// Pointers are one step's slices, rows of B, unit j of gate q at [b * G + q * H + j].

// LSTM forward: the pre-activations x + prod (prod = h W, in lp or scalar_t). Writes the activations
// σ(i), σ(f), tanh(g), σ(o) into `a`, c, tanh(c), h and h's lp copy. With zoneout (Z; Krueger et al. 2017)
// mc and mh are the step's zoneout masks (1: the unit keeps its previous value; at evaluation the rate):
// c = mc c_prev + (1 - mc) c̃, h = mh h_prev + (1 - mh) h̃, with c̃ = f c_prev + i g, h̃ = o tanh(c̃), and
// `tc` holds tanh(c̃).
template <typename scalar_t, typename x_t, typename lp_t, bool Z = false>
void lstm_forward_step(int64_t B, int64_t H, const x_t* __restrict x, const lp_t* __restrict prod,
                       scalar_t* __restrict a, const scalar_t* __restrict c_prev, scalar_t* __restrict c,
                       scalar_t* __restrict tc, scalar_t* __restrict h, lp_t* __restrict hl,
                       const scalar_t* __restrict h_prev = nullptr, const scalar_t* __restrict mc = nullptr,
                       const scalar_t* __restrict mh = nullptr) {
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    scalar_t* ab = a + b * G;
    const int64_t s = b * H;
    UNITS_INDEPENDENT
    for (int64_t j = 0; j < H; ++j) {
      const x_t* xb = x + b * G;
      const lp_t* pb = prod + b * G;
      const scalar_t pi = add_product<scalar_t>(xb[j], pb[j]), pf = add_product<scalar_t>(xb[H + j], pb[H + j]);
      const scalar_t pg = add_product<scalar_t>(xb[2 * H + j], pb[2 * H + j]);
      const scalar_t po = add_product<scalar_t>(xb[3 * H + j], pb[3 * H + j]);
      const scalar_t i = sigmoid(pi), f = sigmoid(pf), g = tanh_vec(pg), o = sigmoid(po);
      ab[j] = i, ab[H + j] = f, ab[2 * H + j] = g, ab[3 * H + j] = o;
      scalar_t cn = f * c_prev[s + j] + i * g;
      const scalar_t t = tanh_vec(cn);
      scalar_t hn = o * t;
      if constexpr (Z) {  // written so that a mask of 1 keeps the previous value exactly
        cn = mc[s + j] * c_prev[s + j] + (1 - mc[s + j]) * cn;
        hn = mh[s + j] * h_prev[s + j] + (1 - mh[s + j]) * hn;
      }
      c[s + j] = cn;
      tc[s + j] = t;
      h[s + j] = hn;
      if constexpr (has_lp<scalar_t, lp_t>) hl[s + j] = to_lp<lp_t>(hn);
    }
  }
}

// LSTM backward: from dh (see for_each_unit) and dc (updated in place: in, dc_t; out, dc_{t-1}) to the
// pre-activations' gradient dpre (and its lp copy). Factors grouped as in the Python sweep. With zoneout
// (Z) dz carries the part of h's gradient that skips a step (in: to h_t; out: to h_{t-1}), added to dh.
template <typename scalar_t, typename lp_t, bool Z = false>
void lstm_backward_step(int64_t B, int64_t H, const scalar_t* dh_base, const lp_t* dh_prod,
                        const scalar_t* __restrict a, const scalar_t* __restrict c_prev,
                        const scalar_t* __restrict tc, scalar_t* __restrict dc, scalar_t* __restrict dpre,
                        lp_t* __restrict dpl, const scalar_t* __restrict mc = nullptr,
                        const scalar_t* __restrict mh = nullptr, scalar_t* __restrict dz = nullptr) {
  const int64_t G = 4 * H;
  for_each_unit(B, H, dh_base, dh_prod, [&](int64_t b, int64_t j, scalar_t dh) {
    const scalar_t* ab = a + b * G;
    scalar_t* db = dpre + b * G;
    const int64_t s = b * H;
    const scalar_t i = ab[j], f = ab[H + j], g = ab[2 * H + j], o = ab[3 * H + j], t = tc[s + j];
    scalar_t dct = dc[s + j], carry = 0;
    if constexpr (Z) {
      dh += dz[s + j];
      dz[s + j] = dh * mh[s + j];
      dh *= 1 - mh[s + j];
      carry = dct * mc[s + j];
      dct *= 1 - mc[s + j];
    }
    const scalar_t d = dct + dh * (o * (1 - t * t));
    const scalar_t di = d * (g * i * (1 - i)), df = d * (c_prev[s + j] * f * (1 - f));
    const scalar_t dg = d * (i * (1 - g * g)), do_ = dh * (t * o * (1 - o));
    db[j] = di, db[H + j] = df, db[2 * H + j] = dg, db[3 * H + j] = do_;
    if constexpr (Z) {
      dc[s + j] = d * f + carry;
    } else {
      dc[s + j] = d * f;
    }
    if constexpr (has_lp<scalar_t, lp_t>) {
      lp_t* lb = dpl + b * G;
      lb[j] = to_lp<lp_t>(di), lb[H + j] = to_lp<lp_t>(df);
      lb[2 * H + j] = to_lp<lp_t>(dg), lb[3 * H + j] = to_lp<lp_t>(do_);
    }
  });
}

// GRU forward (torch variant). `prod` is h W_hh for all three gates (lp or scalar_t). Writes r, z, n into
// `a`, h W_hn + b_hn into ghn, h and h's lp copy.
template <typename scalar_t, typename x_t, typename lp_t>
void gru_forward_step(int64_t B, int64_t H, const x_t* __restrict x, const lp_t* __restrict prod,
                      const scalar_t* __restrict b_hn, scalar_t* __restrict a, scalar_t* __restrict ghn,
                      const scalar_t* __restrict h_prev, scalar_t* __restrict h, lp_t* __restrict hl) {
  const int64_t G = 3 * H;
  for (int64_t b = 0; b < B; ++b) {
    const x_t* xb = x + b * G;
    const lp_t* pb = prod + b * G;
    scalar_t* ab = a + b * G;
    const int64_t s = b * H;
    UNITS_INDEPENDENT
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t r = sigmoid(add_product<scalar_t>(xb[j], pb[j]));
      const scalar_t z = sigmoid(add_product<scalar_t>(xb[H + j], pb[H + j]));
      const scalar_t gn = b_hn[j] + static_cast<scalar_t>(pb[2 * H + j]);
      const scalar_t n = tanh_vec(static_cast<scalar_t>(xb[2 * H + j]) + r * gn);
      const scalar_t hn = n + z * (h_prev[s + j] - n);  // (1 - z) n + z h
      ab[j] = r, ab[H + j] = z, ab[2 * H + j] = n;
      ghn[s + j] = gn;
      h[s + j] = hn;
      if constexpr (has_lp<scalar_t, lp_t>) hl[s + j] = to_lp<lp_t>(hn);
    }
  }
}

// GRU backward: from dh to the gradient of x (d_x: r, z, and n's pre-activation; its lp copy d_xl,
// with lp), of the product [h W_hr, h W_hz, h W_hn + b_hn] (d_g without lp, d_gl with: the operand of
// the next product), b_hn's gradient (summed into d_b_hn), and the part of h_{t-1}'s gradient that does
// not go through the product, `direct` = d_out_{t-1} + dh z.
template <typename scalar_t, typename lp_t>
void gru_backward_step(int64_t B, int64_t H, const scalar_t* dh_base, const lp_t* dh_prod,
                       const scalar_t* __restrict a, const scalar_t* __restrict ghn,
                       const scalar_t* __restrict h_prev, const scalar_t* __restrict d_out_prev,
                       scalar_t* __restrict direct, scalar_t* __restrict d_x, lp_t* __restrict d_xl,
                       scalar_t* __restrict d_g, lp_t* __restrict d_gl, scalar_t* __restrict d_b_hn) {
  const int64_t G = 3 * H;
  for_each_unit(B, H, dh_base, dh_prod, [&](int64_t b, int64_t j, scalar_t dh) {
    const scalar_t* ab = a + b * G;
    const int64_t s = b * H, k = b * G;
    const scalar_t r = ab[j], z = ab[H + j], n = ab[2 * H + j];
    const scalar_t dn = dh * ((1 - z) * (1 - n * n));
    const scalar_t dz = dh * ((h_prev[s + j] - n) * z * (1 - z));
    const scalar_t dr = dn * (ghn[s + j] * r * (1 - r));
    const scalar_t dgn = dn * r;
    direct[s + j] = d_out_prev[s + j] + dh * z;
    d_x[k + j] = dr, d_x[k + H + j] = dz, d_x[k + 2 * H + j] = dn;
    d_b_hn[j] += dgn;
    if constexpr (has_lp<scalar_t, lp_t>) {
      // Each store converts afresh: a named lp_t copied into two places is an aggregate copy, which
      // stops GCC from vectorising the loop (the conversions themselves are shared).
      d_xl[k + j] = to_lp<lp_t>(dr), d_xl[k + H + j] = to_lp<lp_t>(dz), d_xl[k + 2 * H + j] = to_lp<lp_t>(dn);
      d_gl[k + j] = to_lp<lp_t>(dr), d_gl[k + H + j] = to_lp<lp_t>(dz), d_gl[k + 2 * H + j] = to_lp<lp_t>(dgn);
    } else {
      d_g[k + j] = dr, d_g[k + H + j] = dz, d_g[k + 2 * H + j] = dgn;
    }
  });
}

// tanh/ReLU RNN forward: h = φ(x + prod), prod = h_{t-1} W.
template <typename scalar_t, typename x_t, typename lp_t>
void rnn_forward_step(int64_t B, int64_t H, bool relu, const x_t* __restrict x, const lp_t* __restrict prod,
                      scalar_t* __restrict h, lp_t* __restrict hl) {
  auto each = [&](auto phi) {
    UNITS_INDEPENDENT
    for (int64_t k = 0; k < B * H; ++k) {
      const scalar_t v = phi(add_product<scalar_t>(x[k], prod[k]));
      h[k] = v;
      if constexpr (has_lp<scalar_t, lp_t>) hl[k] = to_lp<lp_t>(v);
    }
  };
  if (relu) {
    each([](scalar_t p) { return p < 0 ? scalar_t(0) : p; });  // NaN stays NaN, as relu_ keeps it
  } else {
    each([](scalar_t p) { return tanh_vec(p); });
  }
}

// RNN backward: dpre = dh φ'(pre), with φ' from φ's output as in the Python sweep.
template <typename scalar_t, typename lp_t>
void rnn_backward_step(int64_t B, int64_t H, bool relu, const scalar_t* dh_base, const lp_t* dh_prod,
                       const scalar_t* __restrict out, scalar_t* __restrict dpre, lp_t* __restrict dpl) {
  auto each = [&](auto dphi) {
    for_each_unit(B, H, dh_base, dh_prod, [&](int64_t b, int64_t j, scalar_t dh) {
      const int64_t k = b * H + j;
      const scalar_t d = dh * dphi(out[k]);
      dpre[k] = d;
      if constexpr (has_lp<scalar_t, lp_t>) dpl[k] = to_lp<lp_t>(d);
    });
  };
  if (relu) {
    each([](scalar_t y) { return scalar_t(y > 0 ? 1 : 0); });
  } else {
    each([](scalar_t y) { return 1 - y * y; });
  }
}

// -- dtype dispatch ---------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>, Tag<x_t>, Tag<lp_t>) for the state's dtype, the input's and the products'.
template <typename F>
void dispatch(at::ScalarType state, at::ScalarType x, std::optional<at::ScalarType> lp, F&& f) {
  auto with_state = [&](auto s) {
    if (!lp) return f(s, s, s);
    auto with_lp = [&](auto l) { return x == *lp ? f(s, l, l) : f(s, s, l); };
    if (*lp == at::kBFloat16) return with_lp(Tag<c10::BFloat16>{});
    if (*lp == at::kHalf) return with_lp(Tag<c10::Half>{});
    TORCH_CHECK(false, "deeprnn window kernels: products in ", *lp, " are not supported (bfloat16 or float16)");
  };
  if (state == at::kFloat) return with_state(Tag<float>{});
  if (state == at::kDouble) return with_state(Tag<double>{});
  TORCH_CHECK(false, "deeprnn window kernels: state dtype ", state, " is not supported (float32 or float64)");
}

// A low-precision dtype equal to the state's means no copy at all.
std::optional<at::ScalarType> effective_lp(std::optional<at::ScalarType> lp, at::ScalarType state) {
  return lp && *lp != state ? lp : std::nullopt;
}

// The input projection in a dtype the kernels read: the state's, or lp when there is one.
Tensor input_operand(const Tensor& xproj, at::ScalarType state, std::optional<at::ScalarType> lp) {
  const bool ok = xproj.scalar_type() == state || (lp && xproj.scalar_type() == *lp);
  return (ok ? xproj : xproj.to(state)).contiguous();
}

// The recurrent products' operands, as _product_operands in scratch.py: W (saved for backward) is W_hh,
// or its lp copy; hl is hs, or lp copies of every h (hl[0] = h0).
struct ProductOperands {
  Tensor W, hl;
};

ProductOperands product_operands(const Tensor& W_hh, const Tensor& hs, const Tensor& h0,
                                 std::optional<at::ScalarType> lp) {
  if (!lp) return {W_hh, hs};
  Tensor hl = at::empty(hs.sizes(), hs.options().dtype(*lp));
  hl[0].copy_(h0);
  return {W_hh.to(*lp).contiguous(), hl};
}

// oneDNN's prepacked linear (mkldnn::_reorder_linear_weight / _linear_pointwise, the pair torch.compile's
// CPU weight freezing uses) for float32 products, where this torch build has it: the right operand is
// laid out once per window instead of in every product. At the book's size with 2 threads a step's
// product runs 2-3x faster than MKL's sgemm through at::mm (which splits a 32-row product poorly), the
// LSTM/GRU training step ~17% faster. Not for bfloat16: at::mm already goes to oneDNN there, and
// packing measured 2-4% slower over a training step. Off after any failure, or through
// set_packed_products.
std::atomic<bool> packed_products{true};

struct PackedLinear {
  using Reorder = Tensor(const Tensor&, std::optional<int64_t>);
  using Linear = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                        c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
  c10::TypedOperatorHandle<Reorder> reorder;
  c10::TypedOperatorHandle<Linear> linear;
};

const PackedLinear* packed_linear() {
  static const std::optional<PackedLinear> ops = []() -> std::optional<PackedLinear> {
    try {
      auto& dispatcher = c10::Dispatcher::singleton();
      auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
      auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      if (!reorder || !linear) return std::nullopt;
      return PackedLinear{reorder->typed<PackedLinear::Reorder>(), linear->typed<PackedLinear::Linear>()};
    } catch (const std::exception&) {  // a signature this build does not have
      return std::nullopt;
    }
  }();
  return ops ? &*ops : nullptr;
}

// `a @ right` for every step of a window, a (rows, K), right (K, N): through the packed linear for
// float32, else at::mm into a buffer (with a column-major copy of right in float32/64, which MKL's sgemm
// runs ~18% faster at this shape). result() is the latest product.
class StepProduct {
 public:
  StepProduct(const Tensor& right, int64_t rows) : right_(right), rows_(rows) {
    const auto dtype = right.scalar_type();
    const PackedLinear* ops = packed_linear();
    if (ops != nullptr && packed_products.load() && at::globalContext().userEnabledMkldnn() &&
        dtype == at::kFloat) {
      try {
        packed_ = ops->reorder.call(right.t().contiguous(), rows);
        return;
      } catch (const std::exception&) {
        packed_products.store(false);
      }
    }
    use_mm();
  }

  const Tensor& operator()(const Tensor& a) {
    if (packed_.defined()) {
      try {
        out_ = packed_linear()->linear.call(a, packed_, std::nullopt, "none",
                                            c10::List<std::optional<c10::Scalar>>(), std::nullopt);
        return out_;
      } catch (const std::exception&) {
        packed_products.store(false);
        use_mm();
      }
    }
    at::mm_out(out_, a, right_);
    return out_;
  }

  const Tensor& result() const { return out_; }

 private:
  void use_mm() {
    packed_ = Tensor();
    const auto dtype = right_.scalar_type();
    if (dtype == at::kFloat || dtype == at::kDouble) right_ = right_.t().contiguous().t();
    out_ = at::empty({rows_, right_.size(1)}, right_.options());
  }

  Tensor right_, packed_, out_;
  int64_t rows_;
};

// -- float32 windows split by rows -------------------------------------------------------------------
// The rows of a batch are independent sequences: only the weights are shared. So a float32 window can
// run as one parallel region in which each thread carries its own rows through every step, its
// products and its pointwise passes, with no barrier between steps and no call into ATen per step.
// The products are a hand-written kernel over the right operand packed once per window into panels of
// two vectors' columns (K x 32 with AVX-512, K x 16 with AVX2; contiguous, the last one zero-padded).
// AVX-512: at the book's size a thread's step product, 16 rows x 256 x 1024, takes ~32 us (~250 GFLOP/s,
// about one core's peak) against ~59 us through oneDNN's prepacked linear on one thread, and packing
// costs ~20-30 us against 0.3-1 ms for oneDNN's reorder; an LSTM window's forward and backward run ~1.5x
// faster, a training step ~1.25x. AVX2 (a 6 x 16 micro-kernel, BLIS's shape for 16 vector registers): on
// a 2-core AMD EPYC without AVX-512, one of tm-cpu's forward windows (3 x 512 LSTM, 32 rows, 80 steps)
// ran 1.16-1.42x faster than with oneDNN's per-step products, its training step 1.04-1.10x
// (benchmarks/bench_rows.py). (Window-sized products, 1120 rows, ran no faster this
// way than through oneDNN: those stay there.) Needs at::parallel_for on torch's threads, hence -fopenmp
// (native.py). Only where a kernel is compiled (AVX-512, or AVX2 with FMA) and set_row_products is on;
// otherwise StepProduct.
std::atomic<bool> row_products{true};

// With torch's OpenMP backend at::parallel_for is a pragma in a header: compiled without -fopenmp (a build
// that fell back, native.py) it would run every share on one thread, slower than StepProduct's products.
#if defined(__AVX512F__)
#define DEEPRNN_ROW_KERNEL "AVX-512"
#elif defined(__AVX2__) && defined(__FMA__)
#define DEEPRNN_ROW_KERNEL "AVX2"
#endif
#if defined(DEEPRNN_ROW_KERNEL) && !(AT_PARALLEL_OPENMP && !defined(_OPENMP))
constexpr bool kRowKernel = true;
constexpr const char* kRowKernelIsa = DEEPRNN_ROW_KERNEL;
#else
constexpr bool kRowKernel = false;
constexpr const char* kRowKernelIsa = "";
#endif

class RowProduct {
 public:
#if defined(__AVX512F__)
  static constexpr int64_t kWidth = 32;  // columns per panel: two AVX-512 vectors
  static constexpr int64_t kRows = 8;    // rows per call of the micro-kernel
#else
  static constexpr int64_t kWidth = 16;  // columns per panel: two AVX2 vectors
  static constexpr int64_t kRows = 6;    // rows per call: 12 accumulators, 2 panel loads, 1 broadcast
#endif

  // right: (K, N) float32, any strides.
  explicit RowProduct(const Tensor& right) : K_(right.size(0)), N_(right.size(1)) {
    TORCH_CHECK(right.scalar_type() == at::kFloat, "RowProduct: float32 only");
    const int64_t panels = (N_ + kWidth - 1) / kWidth;
    packed_ = at::empty({panels, K_, kWidth}, right.options());
    const float* b = right.data_ptr<float>();
    const int64_t sk = right.stride(0), sn = right.stride(1);
    float* out = packed_.data_ptr<float>();
    // One pass, a panel per task: rows of kWidth from a row-major right, or gathered from any other layout.
    at::parallel_for(0, panels, 4, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kWidth, width = std::min(kWidth, N_ - n0);
        float* dst = out + p * K_ * kWidth;
        for (int64_t k = 0; k < K_; ++k, dst += kWidth) {
          const float* row = b + k * sk + n0 * sn;
          if (sn == 1) {
            std::memcpy(dst, row, width * sizeof(float));
          } else {
            for (int64_t c = 0; c < width; ++c) dst[c] = row[c * sn];
          }
          std::fill(dst + width, dst + kWidth, 0.0f);
        }
      }
    });
  }

  // c[r * ldc + n] = sum_k a[r * lda + k] * right[k][n], for rows r < rows and every column n.
  void rows(const float* a, int64_t lda, int64_t rows, float* c, int64_t ldc) const {
#if defined(DEEPRNN_ROW_KERNEL)
    const float* p = packed_.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N_; n0 += kWidth, p += K_ * kWidth) {
      const int64_t width = std::min(kWidth, N_ - n0);
      const Mask m0 = mask(width), m1 = mask(width - kWidth / 2);
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        micro_upto<kRows>(std::min(kRows, rows - r0), a + r0 * lda, lda, p, c + r0 * ldc + n0, ldc, m0, m1);
      }
    }
#else
    TORCH_CHECK(false, "RowProduct: built without AVX-512 or AVX2");
#endif
  }

 private:
#if defined(__AVX512F__)
  using Mask = __mmask16;

  static __mmask16 mask(int64_t n) {
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
  }

  // R rows x 32 columns: 2R accumulators, each k one pair of panel loads and R broadcasts.
  template <int R>
  void micro(const float* __restrict a, int64_t lda, const float* __restrict p, float* __restrict c,
             int64_t ldc, __mmask16 m0, __mmask16 m1) const {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K_; ++k) {
      const __m512 b0 = _mm512_load_ps(p + k * kWidth), b1 = _mm512_load_ps(p + k * kWidth + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * lda + k]);
        acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
      _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  using Mask = __m256i;

  // The lanes below n of 8: all ones where stored (maskstore writes a lane whose sign bit is set).
  static __m256i mask(int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), lanes);
  }

  // R rows x 16 columns: 2R accumulators, each k one pair of panel loads and R broadcasts. GCC is told to
  // unroll the loops over rows: otherwise it kept the accumulators in memory, at less than half the speed.
  template <int R>
  void micro(const float* __restrict a, int64_t lda, const float* __restrict p, float* __restrict c,
             int64_t ldc, __m256i m0, __m256i m1) const {
    __m256 acc0[R], acc1[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    const int64_t K = K_;  // a local: the stores through c could alias K_, so the loop would reload it
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_load_ps(p + k * kWidth), b1 = _mm256_load_ps(p + k * kWidth + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
        acc0[r] = _mm256_fmadd_ps(x, b0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(x, b1, acc1[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_maskstore_ps(c + r * ldc, m0, acc0[r]);
      _mm256_maskstore_ps(c + r * ldc + 8, m1, acc1[r]);
    }
  }
#endif

#if defined(DEEPRNN_ROW_KERNEL)
  // micro<n>(...) for a runtime n in [1, R].
  template <int R>
  void micro_upto(int64_t n, const float* a, int64_t lda, const float* p, float* c, int64_t ldc, Mask m0,
                  Mask m1) const {
    if constexpr (R > 1) {
      if (n < R) return micro_upto<R - 1>(n, a, lda, p, c, ldc, m0, m1);
    }
    micro<R>(a, lda, p, c, ldc, m0, m1);
  }
#endif

  int64_t K_, N_;
  Tensor packed_;
};

// Whether a window with this state dtype and low-precision dtype runs split by rows.
bool split_rows(at::ScalarType st, std::optional<at::ScalarType> lp) {
  return kRowKernel && row_products.load() && st == at::kFloat && !lp;
}

// How many shares B rows are split into: one per thread, at most one per row.
int64_t row_shares(int64_t B) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)); }

// Runs body(share, first row, rows) for each share of B rows, the shares in parallel.
template <typename Body>
void for_row_shares(int64_t B, Body&& body) {
  const int64_t shares = row_shares(B);
  at::parallel_for(0, shares, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = B * i / shares, r1 = B * (i + 1) / shares;
      if (r1 > r0) body(i, r0, r1 - r0);
    }
  });
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The slice of a contiguous (T, ...) tensor's step t, as a typed pointer.
template <typename T>
T* step_ptr(const Tensor& t, int64_t step) {
  return t.defined() ? ptr<T>(t) + step * t.stride(0) : nullptr;
}

// A float32 forward window split by rows: for each share of rows and each step, the product h_{t-1} W_hh
// of its rows (hs (T+1, B, H), W_hh (H, G)) into `prod` (rows x G), then step(t, first row, rows, prod)
// for the pointwise pass.
template <typename Step>
void forward_rows(const Tensor& W_hh, const Tensor& hs, Step&& step) {
  const RowProduct right(W_hh);
  const int64_t T = hs.size(0) - 1, B = hs.size(1), H = hs.size(2), G = W_hh.size(1);
  for_row_shares(B, [&](int64_t, int64_t r0, int64_t R) {
    std::vector<float> prod(R * G);
    for (int64_t t = 0; t < T; ++t) {
      right.rows(step_ptr<float>(hs, t) + r0 * H, H, R, prod.data(), G);
      step(t, r0, R, prod.data());
    }
  });
}

// A float32 backward sweep split by rows, t from T-1 down: step(t, share, first row, rows, dh_prod) runs
// the pointwise pass, with dh_prod the rows' share of the previous step's product (nullptr at t = T-1),
// and returns the rows' gradient of the product's output (row stride G); its product with W^T
// (W (H, G)) is the next step's dh_prod. Returns the last product, dh_{-1}'s part through W (B, H).
template <typename Step>
Tensor backward_rows(const Tensor& W, int64_t T, int64_t B, Step&& step) {
  const RowProduct right(W.t());
  const int64_t H = W.size(0), G = W.size(1);
  Tensor dh_prod = at::empty({B, H}, W.options());
  for_row_shares(B, [&](int64_t share, int64_t r0, int64_t R) {
    float* dhp = ptr<float>(dh_prod) + r0 * H;
    const float* prod = nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      right.rows(step(t, share, r0, R, prod), G, R, dhp, H);
      prod = dhp;
    }
  });
  return dh_prod;
}

// -- whole windows ----------------------------------------------------------------------------------
// Forward: per step one product h_{t-1} W (in lp under autocast) and one pointwise pass that adds the
// input projection. Backward: per step one pointwise pass, whose dh adds the previous product to what
// comes from above, and one product.

// Whether a window has zoneout masks, after checking them: both defined (contiguous (T, B, H) in the
// state's dtype) or both absent.
bool checked_zoneout(const std::optional<Tensor>& zc, const std::optional<Tensor>& zh, const Tensor& hs,
                     at::ScalarType st) {
  TORCH_CHECK(zc.has_value() == zh.has_value(), "lstm window: zoneout needs both masks (zc and zh) or neither");
  if (!zc) return false;
  const int64_t T = hs.size(0) - 1, B = hs.size(1), H = hs.size(2);
  for (const Tensor* m : {&*zc, &*zh}) {
    TORCH_CHECK(m->dim() == 3 && m->size(0) == T && m->size(1) == B && m->size(2) == H && m->is_contiguous() &&
                    m->scalar_type() == st,
                "lstm window: a zoneout mask must be a contiguous (T, B, H) tensor in the state's dtype");
  }
  return true;
}

// Runs f(std::integral_constant<bool, z>) for the runtime flag z.
template <typename F>
void with_zoneout(bool z, F&& f) {
  if (z) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Returns [W, acts, hs, cs, tcs, hl], _LSTMWindow's saved tensors. zc, zh: zoneout masks (see
// lstm_forward_step), both or neither.
std::vector<Tensor> lstm_forward(const Tensor& xproj_in, const Tensor& h0, const Tensor& c0, const Tensor& W_hh_in,
                                 std::optional<at::ScalarType> lp_in, const std::optional<Tensor>& zc,
                                 const std::optional<Tensor>& zh) {
  const Tensor W_hh = W_hh_in.contiguous();
  const auto st = W_hh.scalar_type();
  const auto lp = effective_lp(lp_in, st);
  const Tensor xproj = input_operand(xproj_in, st, lp);
  const int64_t T = xproj.size(0), B = xproj.size(1), G = xproj.size(2), H = G / 4;
  TORCH_CHECK(G == 4 * H && W_hh.size(0) == H && W_hh.size(1) == G, "lstm_forward: shapes do not match");
  const auto opts = W_hh.options();
  Tensor acts = at::empty({T, B, G}, opts);
  Tensor hs = at::empty({T + 1, B, H}, opts), cs = at::empty({T + 1, B, H}, opts);
  Tensor tcs = at::empty({T, B, H}, opts);
  const bool zone = checked_zoneout(zc, zh, hs, st);
  const Tensor mc = zone ? *zc : Tensor(), mh = zone ? *zh : Tensor();
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  if (split_rows(st, lp)) {
    with_zoneout(zone, [&](auto z) {
      forward_rows(W_hh, hs, [&](int64_t t, int64_t r0, int64_t R, const float* prod) {
        const int64_t sh = r0 * H, sg = r0 * G;
        const float* zc_t = z ? step_ptr<float>(mc, t) + sh : nullptr;
        const float* zh_t = z ? step_ptr<float>(mh, t) + sh : nullptr;
        lstm_forward_step<float, float, float, decltype(z)::value>(
            R, H, step_ptr<float>(xproj, t) + sg, prod, step_ptr<float>(acts, t) + sg, step_ptr<float>(cs, t) + sh,
            step_ptr<float>(cs, t + 1) + sh, step_ptr<float>(tcs, t) + sh, step_ptr<float>(hs, t + 1) + sh, nullptr,
            step_ptr<float>(hs, t) + sh, zc_t, zh_t);
      });
    });
    return {W_hh, acts, hs, cs, tcs, hs};
  }
  auto [W, hl] = product_operands(W_hh, hs, h0, lp);
  StepProduct product(W, B);
  // hl by init-capture: compilers before C++20's rule (clang < 16) cannot capture a structured binding.
  dispatch(st, xproj.scalar_type(), lp, [&, &hl = hl](auto s, auto xt, auto l) {
    using scalar_t = typename decltype(s)::type;
    using x_t = typename decltype(xt)::type;
    using lp_t = typename decltype(l)::type;
    with_zoneout(zone, [&](auto z) {
      for (int64_t t = 0; t < T; ++t) {
        lstm_forward_step<scalar_t, x_t, lp_t, decltype(z)::value>(
            B, H, step_ptr<x_t>(xproj, t), ptr<lp_t>(product(hl[t])), step_ptr<scalar_t>(acts, t),
            step_ptr<scalar_t>(cs, t), step_ptr<scalar_t>(cs, t + 1), step_ptr<scalar_t>(tcs, t),
            step_ptr<scalar_t>(hs, t + 1), step_ptr<lp_t>(hl, t + 1), step_ptr<scalar_t>(hs, t),
            step_ptr<scalar_t>(mc, t), step_ptr<scalar_t>(mh, t));
      }
    });
  });
  return {W, acts, hs, cs, tcs, hl};
}

// Returns [dpre, dpl, dh, dc]: the gradients of the pre-activations (= of the input projection), their
// lp copy (the products' operand; dpre itself without lp), and of h0 and c0. With x_in_lp (x came in
// lp, so autograd would round its gradient to lp anyway) dpre is dpl, and the float copy of a step's
// dpre only passes through a scratch row. zc, zh: the forward's zoneout masks, both or neither.
std::vector<Tensor> lstm_backward(const Tensor& W, const Tensor& acts, const Tensor& hs, const Tensor& cs,
                                  const Tensor& tcs, const Tensor& hl, const Tensor& d_out_in,
                                  const Tensor& d_hT, const Tensor& d_cT, bool x_in_lp,
                                  const std::optional<Tensor>& zc, const std::optional<Tensor>& zh) {
  const auto st = acts.scalar_type();
  const auto lp = effective_lp(hl.scalar_type(), st);
  x_in_lp = x_in_lp && lp;
  const int64_t T = acts.size(0), B = acts.size(1), G = acts.size(2), H = G / 4;
  TORCH_CHECK(T > 0, "lstm_backward: empty window");
  const bool zone = checked_zoneout(zc, zh, hs, st);
  const Tensor mc = zone ? *zc : Tensor(), mh = zone ? *zh : Tensor();
  Tensor dz = zone ? at::zeros({B, H}, acts.options()) : Tensor();  // h's gradient that skips a step
  const Tensor d_out = d_out_in.to(st).contiguous();
  Tensor dpre = x_in_lp ? at::empty({B, G}, acts.options()) : at::empty_like(acts);
  Tensor dpl = lp ? at::empty(acts.sizes(), acts.options().dtype(*lp)) : dpre;
  const Tensor dh_first = at::add(d_hT.to(st), d_out[T - 1]).contiguous();
  Tensor dc = d_cT.to(st, /*non_blocking=*/false, /*copy=*/true).contiguous();
  if (split_rows(st, lp)) {
    Tensor dh_prod;
    with_zoneout(zone, [&](auto z) {
      // dh_t = (t = T-1 ? dh_first : d_out_t) + the product of step t+1, added in the pointwise pass.
      dh_prod = backward_rows(W, T, B, [&](int64_t t, int64_t, int64_t r0, int64_t R, const float* prod) {
        const int64_t sh = r0 * H, sg = r0 * G;
        float* dp = step_ptr<float>(dpre, t) + sg;
        lstm_backward_step<float, float, decltype(z)::value>(
            R, H, (t == T - 1 ? ptr<float>(dh_first) : step_ptr<float>(d_out, t)) + sh, prod,
            step_ptr<float>(acts, t) + sg, step_ptr<float>(cs, t) + sh, step_ptr<float>(tcs, t) + sh,
            ptr<float>(dc) + sh, dp, nullptr, z ? step_ptr<float>(mc, t) + sh : nullptr,
            z ? step_ptr<float>(mh, t) + sh : nullptr, z ? ptr<float>(dz) + sh : nullptr);
        return dp;
      });
    });
    return {dpre, dpre, zone ? dh_prod.add_(dz) : dh_prod, dc};
  }
  StepProduct product(W.t(), B);
  dispatch(st, st, lp, [&](auto s, auto, auto l) {
    using scalar_t = typename decltype(s)::type;
    using lp_t = typename decltype(l)::type;
    with_zoneout(zone, [&](auto z) {
      const scalar_t* dh_base = ptr<scalar_t>(dh_first);
      const lp_t* dh_prod = nullptr;
      for (int64_t t = T - 1; t >= 0; --t) {
        lstm_backward_step<scalar_t, lp_t, decltype(z)::value>(
            B, H, dh_base, dh_prod, step_ptr<scalar_t>(acts, t), step_ptr<scalar_t>(cs, t),
            step_ptr<scalar_t>(tcs, t), ptr<scalar_t>(dc), step_ptr<scalar_t>(dpre, x_in_lp ? 0 : t),
            step_ptr<lp_t>(dpl, t), step_ptr<scalar_t>(mc, t), step_ptr<scalar_t>(mh, t), ptr<scalar_t>(dz));
        dh_prod = ptr<lp_t>(product(dpl[t]));  // dh_{t-1} = this + d_out_{t-1}, added in the next pass
        if (t > 0) dh_base = step_ptr<scalar_t>(d_out, t - 1);
      }
    });
  });
  Tensor dh = product.result().to(st);
  if (zone) dh = dh.add(dz);
  return {x_in_lp ? dpl : dpre, dpl, dh, dc};
}

// Returns [W, acts, ghn, hs, hl], _GRUWindow's saved tensors.
std::vector<Tensor> gru_forward(const Tensor& xproj_in, const Tensor& h0, const Tensor& W_hh_in,
                                const Tensor& b_hn_in, std::optional<at::ScalarType> lp_in) {
  const Tensor W_hh = W_hh_in.contiguous();
  const auto st = W_hh.scalar_type();
  const auto lp = effective_lp(lp_in, st);
  const Tensor xproj = input_operand(xproj_in, st, lp);
  const Tensor b_hn = b_hn_in.to(st).contiguous();
  const int64_t T = xproj.size(0), B = xproj.size(1), G = xproj.size(2), H = G / 3;
  TORCH_CHECK(G == 3 * H && W_hh.size(0) == H && W_hh.size(1) == G && b_hn.numel() == H,
              "gru_forward: shapes do not match");
  const auto opts = W_hh.options();
  Tensor acts = at::empty({T, B, G}, opts);
  Tensor ghn = at::empty({T, B, H}, opts);
  Tensor hs = at::empty({T + 1, B, H}, opts);
  hs[0].copy_(h0);
  if (split_rows(st, lp)) {
    forward_rows(W_hh, hs, [&](int64_t t, int64_t r0, int64_t R, const float* prod) {
      const int64_t sh = r0 * H, sg = r0 * G;
      gru_forward_step<float, float, float>(R, H, step_ptr<float>(xproj, t) + sg, prod, ptr<float>(b_hn),
                                            step_ptr<float>(acts, t) + sg, step_ptr<float>(ghn, t) + sh,
                                            step_ptr<float>(hs, t) + sh, step_ptr<float>(hs, t + 1) + sh, nullptr);
    });
    return {W_hh, acts, ghn, hs, hs};
  }
  auto [W, hl] = product_operands(W_hh, hs, h0, lp);
  StepProduct product(W, B);  // one product for all three gates
  dispatch(st, xproj.scalar_type(), lp, [&, &hl = hl](auto s, auto xt, auto l) {
    using scalar_t = typename decltype(s)::type;
    using x_t = typename decltype(xt)::type;
    using lp_t = typename decltype(l)::type;
    for (int64_t t = 0; t < T; ++t) {
      gru_forward_step<scalar_t, x_t, lp_t>(B, H, step_ptr<x_t>(xproj, t), ptr<lp_t>(product(hl[t])),
                                            ptr<scalar_t>(b_hn), step_ptr<scalar_t>(acts, t),
                                            step_ptr<scalar_t>(ghn, t), step_ptr<scalar_t>(hs, t),
                                            step_ptr<scalar_t>(hs, t + 1), step_ptr<lp_t>(hl, t + 1));
    }
  });
  return {W, acts, ghn, hs, hl};
}

// Returns [d_x, d_g, d_b_hn, dh]: the gradient of the input projection (T, B, 3H), in lp when x_in_lp
// (as in lstm_backward), of the recurrent product [h W_hr, h W_hz, h W_hn + b_hn] in the products'
// dtype (the right operand of W_hh's gradient), of b_hn, and of h0.
std::vector<Tensor> gru_backward(const Tensor& W, const Tensor& acts, const Tensor& ghn, const Tensor& hs,
                                 const Tensor& hl, const Tensor& d_out_in, const Tensor& d_hT, bool x_in_lp) {
  const auto st = acts.scalar_type();
  const auto lp = effective_lp(hl.scalar_type(), st);
  x_in_lp = x_in_lp && lp;
  const int64_t T = acts.size(0), B = acts.size(1), G = acts.size(2), H = G / 3;
  TORCH_CHECK(T > 0, "gru_backward: empty window");
  const auto opts = acts.options();
  const Tensor d_out = d_out_in.to(st).contiguous();
  // Only the arrays returned span the window; a step's other copy goes to a (B, 3H) scratch row.
  Tensor d_x = at::empty(x_in_lp ? at::IntArrayRef{B, G} : acts.sizes(), opts);
  Tensor d_xl = lp ? at::empty(x_in_lp ? acts.sizes() : at::IntArrayRef{B, G}, opts.dtype(*lp)) : Tensor();
  Tensor d_g = lp ? at::empty(acts.sizes(), opts.dtype(*lp)) : at::empty_like(acts);
  Tensor d_b_hn = at::zeros({H}, opts);
  const Tensor dh_first = at::add(d_hT.to(st), d_out[T - 1]).contiguous();
  const Tensor zeros = at::zeros({B, H}, opts);  // d_out_{-1}: nothing comes in before step 0
  // `direct` alternates between two buffers: a step reads the previous one (dh = it + product).
  Tensor direct[2] = {at::empty({B, H}, opts), at::empty({B, H}, opts)};
  if (split_rows(st, lp)) {
    Tensor d_b_parts = at::zeros({row_shares(B), H}, opts);  // b_hn's gradient, summed per share
    // dh_t = (t = T-1 ? dh_first : step t+1's `direct`) + the product of step t+1.
    Tensor dh_prod = backward_rows(W, T, B, [&](int64_t t, int64_t share, int64_t r0, int64_t R, const float* prod) {
      const int64_t sh = r0 * H, sg = r0 * G;
      float* dg = step_ptr<float>(d_g, t) + sg;
      gru_backward_step<float, float>(
          R, H, (t == T - 1 ? ptr<float>(dh_first) : ptr<float>(direct[(t + 1) % 2])) + sh, prod,
          step_ptr<float>(acts, t) + sg, step_ptr<float>(ghn, t) + sh, step_ptr<float>(hs, t) + sh,
          (t > 0 ? step_ptr<float>(d_out, t - 1) : ptr<float>(zeros)) + sh, ptr<float>(direct[t % 2]) + sh,
          step_ptr<float>(d_x, t) + sg, nullptr, dg, nullptr, ptr<float>(d_b_parts) + share * H);
      return dg;
    });
    return {d_x, d_g, d_b_parts.sum(0), at::add(direct[0], dh_prod)};
  }
  StepProduct product(W.t(), B);
  dispatch(st, st, lp, [&](auto s, auto, auto l) {
    using scalar_t = typename decltype(s)::type;
    using lp_t = typename decltype(l)::type;
    constexpr bool with_lp = has_lp<scalar_t, lp_t>;
    const scalar_t* dh_base = ptr<scalar_t>(dh_first);
    const lp_t* dh_prod = nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      const Tensor& dir = direct[t % 2];
      gru_backward_step<scalar_t, lp_t>(
          B, H, dh_base, dh_prod, step_ptr<scalar_t>(acts, t), step_ptr<scalar_t>(ghn, t), step_ptr<scalar_t>(hs, t),
          t > 0 ? step_ptr<scalar_t>(d_out, t - 1) : ptr<scalar_t>(zeros), ptr<scalar_t>(dir),
          step_ptr<scalar_t>(d_x, x_in_lp ? 0 : t), step_ptr<lp_t>(d_xl, x_in_lp ? t : 0),
          with_lp ? nullptr : step_ptr<scalar_t>(d_g, t), with_lp ? step_ptr<lp_t>(d_g, t) : nullptr,
          ptr<scalar_t>(d_b_hn));
      dh_prod = ptr<lp_t>(product(d_g[t]));
      dh_base = ptr<scalar_t>(dir);
    }
  });
  return {x_in_lp ? d_xl : d_x, d_g, d_b_hn, at::add(direct[0], product.result())};
}

// Returns [W, hs, hl], _RNNWindow's saved tensors.
std::vector<Tensor> rnn_forward(const Tensor& xproj_in, const Tensor& h0, const Tensor& W_hh_in, bool relu,
                                std::optional<at::ScalarType> lp_in) {
  const Tensor W_hh = W_hh_in.contiguous();
  const auto st = W_hh.scalar_type();
  const auto lp = effective_lp(lp_in, st);
  const Tensor xproj = input_operand(xproj_in, st, lp);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2);
  TORCH_CHECK(W_hh.size(0) == H && W_hh.size(1) == H, "rnn_forward: shapes do not match");
  Tensor hs = at::empty({T + 1, B, H}, W_hh.options());
  hs[0].copy_(h0);
  if (split_rows(st, lp)) {
    forward_rows(W_hh, hs, [&](int64_t t, int64_t r0, int64_t R, const float* prod) {
      rnn_forward_step<float, float, float>(R, H, relu, step_ptr<float>(xproj, t) + r0 * H, prod,
                                            step_ptr<float>(hs, t + 1) + r0 * H, nullptr);
    });
    return {W_hh, hs, hs};
  }
  auto [W, hl] = product_operands(W_hh, hs, h0, lp);
  StepProduct product(W, B);
  dispatch(st, xproj.scalar_type(), lp, [&, &hl = hl](auto s, auto xt, auto l) {
    using scalar_t = typename decltype(s)::type;
    using x_t = typename decltype(xt)::type;
    using lp_t = typename decltype(l)::type;
    for (int64_t t = 0; t < T; ++t) {
      rnn_forward_step<scalar_t, x_t, lp_t>(B, H, relu, step_ptr<x_t>(xproj, t), ptr<lp_t>(product(hl[t])),
                                            step_ptr<scalar_t>(hs, t + 1), step_ptr<lp_t>(hl, t + 1));
    }
  });
  return {W, hs, hl};
}

// Returns [dpre, dpl, dh]: the pre-activations' gradient (= the input projection's), its lp copy
// (dpre itself without lp), and h0's gradient; x_in_lp as in lstm_backward.
std::vector<Tensor> rnn_backward(const Tensor& W, const Tensor& hs, const Tensor& hl, const Tensor& d_out_in,
                                 const Tensor& d_hT, bool relu, bool x_in_lp) {
  const auto st = hs.scalar_type();
  const auto lp = effective_lp(hl.scalar_type(), st);
  x_in_lp = x_in_lp && lp;
  const int64_t T = hs.size(0) - 1, B = hs.size(1), H = hs.size(2);
  TORCH_CHECK(T > 0, "rnn_backward: empty window");
  const Tensor d_out = d_out_in.to(st).contiguous();
  Tensor dpre = x_in_lp ? at::empty({B, H}, hs.options()) : at::empty({T, B, H}, hs.options());
  Tensor dpl = lp ? at::empty({T, B, H}, hs.options().dtype(*lp)) : dpre;
  const Tensor dh_first = at::add(d_hT.to(st), d_out[T - 1]).contiguous();
  if (split_rows(st, lp)) {
    Tensor dh_prod = backward_rows(W, T, B, [&](int64_t t, int64_t, int64_t r0, int64_t R, const float* prod) {
      const int64_t sh = r0 * H;
      float* dp = step_ptr<float>(dpre, t) + sh;
      rnn_backward_step<float, float>(R, H, relu, (t == T - 1 ? ptr<float>(dh_first) : step_ptr<float>(d_out, t)) + sh,
                                      prod, step_ptr<float>(hs, t + 1) + sh, dp, nullptr);
      return dp;
    });
    return {dpre, dpre, dh_prod};
  }
  StepProduct product(W.t(), B);
  dispatch(st, st, lp, [&](auto s, auto, auto l) {
    using scalar_t = typename decltype(s)::type;
    using lp_t = typename decltype(l)::type;
    const scalar_t* dh_base = ptr<scalar_t>(dh_first);
    const lp_t* dh_prod = nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      rnn_backward_step<scalar_t, lp_t>(B, H, relu, dh_base, dh_prod, step_ptr<scalar_t>(hs, t + 1),
                                        step_ptr<scalar_t>(dpre, x_in_lp ? 0 : t), step_ptr<lp_t>(dpl, t));
      dh_prod = ptr<lp_t>(product(dpl[t]));
      if (t > 0) dh_base = step_ptr<scalar_t>(d_out, t - 1);
    }
  });
  return {x_in_lp ? dpl : dpre, dpl, product.result().to(st)};
}

// -- one step of several streams, split by rows (sampling, beam search) ---------------------------------
// Generation steps B streams one token at a time, returning to Python after each step to draw the next
// tokens. Through torch a step is ~10 calls per layer: two products and the cell's pointwise ops. Here the
// weights are packed once per generation (RowProduct) and each of torch's threads carries its share of
// the rows through every layer: its rows' two products, the cell's pointwise pass, the residual sum, with
// no barrier between layers (rows are independent) and one parallel region per step, which ends with the
// rows' logits. Same maths as torch.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell (pointwise.h's
// cell_step, which the greedy decoder runs too), the residual connections of layers 2..L and the output
// layer. Only where a row kernel is compiled.
class RowStepper {
 public:
  // w_ih[l]: (G*H, in_l), w_hh[l]: (G*H, H), out_weight: (V, H), torch.nn's layout; biases (G*H, V) or absent.
  RowStepper(const std::string& cell, const std::vector<Tensor>& w_ih, const std::vector<Tensor>& w_hh,
             const std::vector<std::optional<Tensor>>& b_ih, const std::vector<std::optional<Tensor>>& b_hh,
             bool residual, const Tensor& out_weight, const std::optional<Tensor>& out_bias)
      : residual_(residual) {
    TORCH_CHECK(kRowKernel, "row stepper: built without a row product kernel");
    cell_ = deeprnn::cell_named(cell);
    TORCH_CHECK(cell_ != deeprnn::Cell::kUnknown, "row stepper: unknown cell '", cell, "'");
    gates_ = deeprnn::gates_of(cell_);
    const size_t L = w_ih.size();
    TORCH_CHECK(L > 0 && w_hh.size() == L && b_ih.size() == L && b_hh.size() == L,
                "row stepper: one w_ih, w_hh, b_ih and b_hh per layer");
    TORCH_CHECK(w_hh[0].dim() == 2, "row stepper: layer 1's weights must be float32 CPU (G*H, in) matrices");
    H_ = w_hh[0].size(1);
    for (size_t l = 0; l < L; ++l) {
      for (const Tensor* w : {&w_ih[l], &w_hh[l]}) {
        TORCH_CHECK(w->dim() == 2 && w->size(0) == gates_ * H_ && w->scalar_type() == at::kFloat && w->device().is_cpu(),
                    "row stepper: layer ", l + 1, "'s weights must be float32 CPU (", gates_ * H_, ", in) matrices");
      }
      TORCH_CHECK(w_hh[l].size(1) == H_ && (l == 0 || w_ih[l].size(1) == H_),
                  "row stepper: layer ", l + 1, " has the wrong shape");
      inputs_.push_back(w_ih[l].size(1));
      ih_.emplace_back(w_ih[l].t());
      hh_.emplace_back(w_hh[l].t());
      bih_.push_back(bias(b_ih[l], gates_ * H_));
      bhh_.push_back(bias(b_hh[l], gates_ * H_));
    }
    TORCH_CHECK(out_weight.dim() == 2 && out_weight.size(1) == H_ && out_weight.scalar_type() == at::kFloat &&
                    out_weight.device().is_cpu(),
                "row stepper: the output weight must be a float32 CPU (V, ", H_, ") matrix");
    V_ = out_weight.size(0);
    out_.emplace_back(out_weight.t());
    bout_ = bias(out_bias, V_);
  }

  // x (B, in_1) float32; h[l], c[l] (B, H) float32, c only for the LSTM. Returns [logits (B, V), the new h
  // of every layer, then the new c of every layer]; the inputs are not written.
  std::vector<Tensor> step(const Tensor& x_in, const std::vector<Tensor>& h_in, const std::vector<Tensor>& c_in) const {
    const int64_t L = static_cast<int64_t>(ih_.size()), G = gates_ * H_, H = H_;
    const bool lstm = gates_ == 4;
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == inputs_[0] && x_in.scalar_type() == at::kFloat &&
                    x_in.device().is_cpu(),
                "row stepper: x must be a float32 CPU (B, ", inputs_[0], ") matrix");
    const int64_t B = x_in.size(0);
    TORCH_CHECK(static_cast<int64_t>(h_in.size()) == L && static_cast<int64_t>(c_in.size()) == (lstm ? L : 0),
                "row stepper: one h per layer, and one c per layer for the LSTM only");
    const Tensor x = x_in.contiguous();
    const auto state = [&](const Tensor& t) {
      TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == H && t.scalar_type() == at::kFloat &&
                      t.device().is_cpu(),
                  "row stepper: each state must be a float32 CPU (B, H) matrix");
      return t.contiguous();
    };
    std::vector<Tensor> h, c, out;
    out.push_back(at::empty({B, V_}, x.options()));
    for (int64_t l = 0; l < L; ++l) {
      h.push_back(state(h_in[l]));
      if (lstm) c.push_back(state(c_in[l]));
      out.push_back(at::empty({B, H}, x.options()));
    }
    for (int64_t l = 0; l < (lstm ? L : 0); ++l) out.push_back(at::empty({B, H}, x.options()));
    for_row_shares(B, [&](int64_t, int64_t r0, int64_t R) {
      std::vector<float> gi(R * G), gh(R * G), sum(residual_ && L > 1 ? R * H : 0);
      const float* xr = ptr<float>(x) + r0 * inputs_[0];
      int64_t ldx = inputs_[0];
      for (int64_t l = 0; l < L; ++l) {
        ih_[l].rows(xr, ldx, R, gi.data(), G);
        hh_[l].rows(ptr<float>(h[l]) + r0 * H, H, R, gh.data(), G);
        float* hn = ptr<float>(out[1 + l]) + r0 * H;
        const float* bi = bih_[l].data();
        const float* bh = bhh_[l].data();
        for (int64_t r = 0; r < R; ++r) {
          float* a = gi.data() + r * G;  // + b_ih, + b_hh: the gates as torch's cells take them
          float* b = gh.data() + r * G;
          UNITS_INDEPENDENT
          for (int64_t j = 0; j < G; ++j) {
            a[j] += bi[j];
            b[j] += bh[j];
          }
          const int64_t s = (r0 + r) * H;
          deeprnn::cell_step(cell_, H, a, b, ptr<float>(h[l]) + s, lstm ? ptr<float>(c[l]) + s : nullptr,
                             lstm ? ptr<float>(out[1 + L + l]) + s : nullptr, hn + r * H);
        }
        if (residual_ && l > 0) {  // the next layer's input (and the output): h + this layer's input
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t j = 0; j < H; ++j) sum[r * H + j] = hn[r * H + j] + xr[r * ldx + j];
          }
          xr = sum.data();
        } else {
          xr = hn;
        }
        ldx = H;
      }
      float* logits = ptr<float>(out[0]) + r0 * V_;
      out_[0].rows(xr, ldx, R, logits, V_);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t v = 0; v < V_; ++v) logits[r * V_ + v] += bout_[v];
      }
    });
    return out;
  }

 private:
  // A bias as G floats, zeros where the layer has none.
  static std::vector<float> bias(const std::optional<Tensor>& b, int64_t G) {
    if (!b) return std::vector<float>(G, 0.0f);
    const Tensor d = b->detach().to(at::kCPU, at::kFloat).contiguous();
    TORCH_CHECK(d.numel() == G, "row stepper: a bias must have ", G, " values");
    return std::vector<float>(d.data_ptr<float>(), d.data_ptr<float>() + G);
  }

  bool residual_;
  deeprnn::Cell cell_ = deeprnn::Cell::kUnknown;
  int64_t gates_ = 0, H_ = 0, V_ = 0;
  std::vector<int64_t> inputs_;
  std::vector<RowProduct> ih_, hh_, out_;  // out_: the output layer's one product
  std::vector<std::vector<float>> bih_, bhh_;
  std::vector<float> bout_;
};

}  // namespace

void register_greedy(pybind11::module& m);  // greedy.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deeprnn's compiled window kernels: see deeprnn.models.scratch";
  m.def("lstm_forward", &lstm_forward, py::call_guard<py::gil_scoped_release>(),
        "LSTM window forward -> [W, acts, hs, cs, tcs, hl]", py::arg("xproj"), py::arg("h0"), py::arg("c0"),
        py::arg("W_hh"), py::arg("lp") = py::none(), py::arg("zc") = py::none(), py::arg("zh") = py::none());
  m.def("lstm_backward", &lstm_backward, py::call_guard<py::gil_scoped_release>(),
        "LSTM window backward -> [dpre, dpl, dh, dc]", py::arg("W"), py::arg("acts"), py::arg("hs"), py::arg("cs"),
        py::arg("tcs"), py::arg("hl"), py::arg("d_out"), py::arg("d_hT"), py::arg("d_cT"), py::arg("x_in_lp"),
        py::arg("zc") = py::none(), py::arg("zh") = py::none());
  m.def("gru_forward", &gru_forward, py::call_guard<py::gil_scoped_release>(), "GRU window forward -> [W, acts, ghn, hs, hl]");
  m.def("gru_backward", &gru_backward, py::call_guard<py::gil_scoped_release>(), "GRU window backward -> [d_x, d_g, d_b_hn, dh]");
  m.def("rnn_forward", &rnn_forward, py::call_guard<py::gil_scoped_release>(), "RNN window forward -> [W, hs, hl]");
  m.def("rnn_backward", &rnn_backward, py::call_guard<py::gil_scoped_release>(), "RNN window backward -> [dpre, dpl, dh]");
  m.def("set_packed_products", [](bool on) { packed_products.store(on); },
        "Whether float32 products may use oneDNN's prepacked linear (else at::mm); for tests");
  m.def("packed_products", [] { return packed_products.load() && packed_linear() != nullptr; },
        "Whether products use oneDNN's prepacked linear where they can");
  m.def("set_row_products", [](bool on) { row_products.store(on); },
        "Whether float32 windows may run split by rows with the row product kernel; for tests");
  m.def("row_share_threads", [](int64_t rows) {
          std::mutex mutex;
          std::set<std::thread::id> ids;
          for_row_shares(rows, [&](int64_t, int64_t, int64_t) {
            std::lock_guard<std::mutex> hold(mutex);
            ids.insert(std::this_thread::get_id());
          });
          return static_cast<int64_t>(ids.size());
        },
        "How many threads ran the shares of `rows` rows (tests: the row split really runs in parallel)");
  m.def("row_products", [] { return kRowKernel && row_products.load(); },
        "Whether float32 windows run split by rows with the row product kernel");
  m.def("row_kernel_isa", [] { return std::string(kRowKernelIsa); },
        "The row product kernel's instruction set (AVX-512 or AVX2), empty where none is compiled");
  py::class_<RowStepper>(m, "RowStepper")
      .def(py::init<const std::string&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                    const std::vector<std::optional<Tensor>>&, const std::vector<std::optional<Tensor>>&, bool,
                    const Tensor&, const std::optional<Tensor>&>(),
           py::arg("cell"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("residual"),
           py::arg("out_weight"), py::arg("out_bias"))
      .def("step", &RowStepper::step, py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("h"),
           py::arg("c"), "One step of B streams -> [logits, new h of each layer, new c of each layer (LSTM)]");
  register_greedy(m);
}
