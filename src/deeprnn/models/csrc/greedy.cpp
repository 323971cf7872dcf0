// Greedy decoding of one stream on the CPU, the whole loop in C++ (deeprnn.generate, strategy "greedy").
//
// Why: one stream's step is a few matrix-vector products (3.3 MB of float32 weights read per character
// for the book's 2 x 256 LSTM) and ~1,000 units of pointwise work. Through torch that is ~10 calls per
// character, whose dispatch costs as much as the arithmetic, and MKL's matrix-vector product reads the
// weights from L3 on one core. Here the weights are cut into slices (a share of every layer's units, and
// of the vocabulary), each packed once so that a product reads it in order. `workers` threads take the
// slices in turn, so with one slice per worker the cores read their shares of the weights at once (for
// the book's model, 1.65 MB each per character, from L2 and L3). A character costs one pass over the
// slices and L + 1 spin barriers (after each layer, and after the logits).
//
// Same maths as torch.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell, the residual connections of
// layers 2..L and the output layer; sigmoid and tanh are the pointwise.h functions the window kernels
// use (about 1 ulp from torch's), and the sums run in another order than MKL's, so logits differ from
// torch's in the last bits: an argmax between two near-equal logits can differ. argmax takes the first
// maximum, as torch.argmax does. How many workers run does not change any result.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "pointwise.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <atomic>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using at::Tensor;
using deeprnn::sigmoid;
using deeprnn::tanh_vec;
using deeprnn::Cell;
using deeprnn::gates_of;

constexpr int64_t kLanes = 16;               // floats in one 64-byte line
constexpr int64_t kBlockVectors = 8;          // columns per block: 8 x 16, held in 8 registers
constexpr int64_t kBlock = kBlockVectors * kLanes;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

const float* f32(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "greedy decoder: ", what, " must be a contiguous float32 CPU tensor");
  return t.data_ptr<float>();
}

// A float32 contiguous copy of a weight (no copy when it already is one).
Tensor dense(const Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

// Zeroed float storage aligned to cache lines (C++17 aligned new: portable, unlike std::aligned_alloc).
struct AlignedDelete {
  void operator()(float* p) const { ::operator delete(p, std::align_val_t{64}); }
};

struct Floats {
  std::unique_ptr<float, AlignedDelete> data;

  explicit Floats(int64_t n = 0) {
    if (n == 0) return;
    const auto bytes = static_cast<size_t>(round_up(n * static_cast<int64_t>(sizeof(float)), 64));
    data.reset(static_cast<float*>(::operator new(bytes, std::align_val_t{64})));
    std::memset(data.get(), 0, bytes);
  }
  float* get() const { return data.get(); }
};

// y (N) += x (K) P for a K x N matrix P, N padded to whole vectors. P is stored block by block (kBlock
// columns each, the last one narrower), each block's K rows contiguous, so a product reads P once, in
// order, and keeps a block's sums in registers.
class Panel {
 public:
  Panel() = default;

  // Column c of P is row rows[c] of the torch-layout weight W (out, K), contiguous float32. Built with
  // torch's gather and transposing copy (a plain loop here, strided on one side, took 4 ms for the book's
  // 3.3 MB, more than 100 characters of decoding).
  Panel(const Tensor& W, const std::vector<int64_t>& rows) : K_(W.size(1)), N_(round_up(rows.size(), kLanes)),
                                                             data_(K_ * N_) {
    f32(W, "a weight");
    const auto n = static_cast<int64_t>(rows.size());
    const Tensor index = at::tensor(rows, at::kLong);
    const Tensor cols = W.index_select(0, index).t();  // (K, n), a view of the gathered rows
    for (int64_t b0 = 0; b0 < N_; b0 += kBlock) {
      const int64_t width = std::min(kBlock, N_ - b0), real = std::max<int64_t>(0, std::min(width, n - b0));
      if (real == 0) continue;  // padding only: stays zero
      Tensor block = at::from_blob(data_.get() + b0 * K_, {K_, width}, at::kFloat);
      block.narrow(1, 0, real).copy_(cols.narrow(1, b0, real));
    }
  }

  int64_t width() const { return N_; }

  void accumulate(const float* __restrict x, float* __restrict y) const {
    for (int64_t b0 = 0; b0 < N_; b0 += kBlock) {
      const int64_t width = std::min(kBlock, N_ - b0);
      block_product(x, data_.get() + b0 * K_, width, y + b0);
    }
  }

  // y += P[k]: the product with a one-hot x.
  void add_row(int64_t k, float* __restrict y) const {
    for (int64_t b0 = 0; b0 < N_; b0 += kBlock) {
      const int64_t width = std::min(kBlock, N_ - b0);
      const float* row = data_.get() + b0 * K_ + k * width;
      for (int64_t c = 0; c < width; ++c) y[b0 + c] += row[c];
    }
  }

 private:
  void block_product(const float* __restrict x, const float* __restrict p, int64_t width, float* __restrict y) const {
#if defined(__AVX512F__)
    switch (width / kLanes) {
      case 8: return block_avx512<8>(x, p, y);
      case 7: return block_avx512<7>(x, p, y);
      case 6: return block_avx512<6>(x, p, y);
      case 5: return block_avx512<5>(x, p, y);
      case 4: return block_avx512<4>(x, p, y);
      case 3: return block_avx512<3>(x, p, y);
      case 2: return block_avx512<2>(x, p, y);
      default: return block_avx512<1>(x, p, y);
    }
#else
    for (int64_t k = 0; k < K_; ++k) {
      const float xk = x[k];
      const float* row = p + k * width;
      for (int64_t c = 0; c < width; ++c) y[c] += xk * row[c];
    }
#endif
  }

#if defined(__AVX512F__)
  template <int V>
  void block_avx512(const float* __restrict x, const float* __restrict p, float* __restrict y) const {
    __m512 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = _mm512_loadu_ps(y + v * kLanes);
    for (int64_t k = 0; k < K_; ++k) {
      const __m512 xk = _mm512_set1_ps(x[k]);
      const float* row = p + k * V * kLanes;
      for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(xk, _mm512_load_ps(row + v * kLanes), acc[v]);
    }
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + v * kLanes, acc[v]);
  }
#endif

  int64_t K_ = 0, N_ = 0;
  Floats data_;
};

// A reusable barrier for a few threads that spin briefly, then yield: a step is a few microseconds, so
// sleeping would cost more than the wait, and yielding keeps a loaded machine moving.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}

  void wait() {
    if (n_ == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins >= 2000) std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<int> phase_{0};
};

Cell parse_cell(const std::string& name) {
  const Cell cell = deeprnn::cell_named(name);
  TORCH_CHECK(cell != Cell::kUnknown, "greedy decoder: unknown cell ", name);
  return cell;
}

class GreedyDecoder {
 public:
  GreedyDecoder(const std::string& cell, const std::vector<Tensor>& w_ih, const std::vector<Tensor>& w_hh,
                const std::vector<std::optional<Tensor>>& b_ih, const std::vector<std::optional<Tensor>>& b_hh,
                const std::optional<Tensor>& embedding, const Tensor& out_w, const std::optional<Tensor>& out_b,
                bool residual, int64_t slices)
      : cell_(parse_cell(cell)), G_(gates_of(cell_)), L_(static_cast<int64_t>(w_hh.size())), H_(w_hh.at(0).size(1)),
        V_(out_w.size(0)), residual_(residual) {
    TORCH_CHECK(slices >= 1 && slices <= H_, "greedy decoder: slices must be in [1, hidden size]");
    TORCH_CHECK(static_cast<int64_t>(w_ih.size()) == L_ && static_cast<int64_t>(b_ih.size()) == L_ &&
                    static_cast<int64_t>(b_hh.size()) == L_,
                "greedy decoder: one w_ih, w_hh, b_ih, b_hh per layer");
    TORCH_CHECK(out_w.size(1) == H_, "greedy decoder: output weight must be (vocab, hidden)");
    if (embedding) {
      embedding_ = dense(*embedding);
      TORCH_CHECK(embedding_.dim() == 2 && embedding_.size(0) == V_ && embedding_.size(1) == w_ih[0].size(1),
                  "greedy decoder: the embedding must be (vocab, layer 1's input size)");
      emb_ = f32(embedding_, "embedding");
    } else {
      TORCH_CHECK(w_ih[0].size(1) == V_, "greedy decoder: one-hot input needs layer 1's input size == vocab");
    }
    for (int64_t l = 0; l < L_; ++l) {
      TORCH_CHECK(w_ih[l].size(0) == G_ * H_ && w_hh[l].size(0) == G_ * H_ && w_hh[l].size(1) == H_ &&
                      (l == 0 || w_ih[l].size(1) == H_),
                  "greedy decoder: layer ", l, " has the wrong shape");
      for (const auto* b : {&b_ih[l], &b_hh[l]}) {
        TORCH_CHECK(!*b || (*b)->numel() == G_ * H_, "greedy decoder: layer ", l, "'s biases must have G x H values");
      }
    }
    TORCH_CHECK(!out_b || out_b->numel() == V_, "greedy decoder: the output bias must have vocab values");
    std::vector<Tensor> ih, hh;  // float32 contiguous, made once for all slices
    for (int64_t l = 0; l < L_; ++l) {
      ih.push_back(dense(w_ih[l]));
      hh.push_back(dense(w_hh[l]));
    }
    const Tensor out_dense = dense(out_w);
    slices_.resize(slices);
    for (int64_t t = 0; t < slices; ++t) {
      Slice& s = slices_[t];
      s.u0 = H_ * t / slices;
      s.u1 = H_ * (t + 1) / slices;
      s.v0 = V_ * t / slices;
      s.v1 = V_ * (t + 1) / slices;
      const int64_t u = s.u1 - s.u0;
      std::vector<int64_t> rows(G_ * u);  // local column g * u + j <- row g * H + u0 + j
      for (int64_t g = 0; g < G_; ++g)
        for (int64_t j = 0; j < u; ++j) rows[g * u + j] = g * H_ + s.u0 + j;
      for (int64_t l = 0; l < L_; ++l) {
        s.ih.emplace_back(ih[l], rows);
        s.hh.emplace_back(hh[l], rows);
        s.b_ih.push_back(local_bias(b_ih[l], rows, s.ih.back().width()));
        s.b_hh.push_back(local_bias(b_hh[l], rows, s.hh.back().width()));
      }
      std::vector<int64_t> vrows(s.v1 - s.v0);
      for (int64_t v = s.v0; v < s.v1; ++v) vrows[v - s.v0] = v;
      s.out = Panel(out_dense, vrows);
      s.b_out = local_bias(out_b, vrows, s.out.width());
      s.gi = Floats(s.ih[0].width());  // every layer's gates have the slice's width
      s.gh = Floats(s.hh[0].width());
      s.logits = Floats(s.out.width());
    }
    for (int p = 0; p < 2; ++p) {
      h_[p] = Floats(L_ * H_);
      x_[p] = Floats(L_ * H_);
    }
    c_ = Floats(L_ * H_);
    logits_ = Floats(V_);
  }

  // The state (L, H) each, as the model keeps it (c for the LSTM only).
  void set_state(const Tensor& h, const std::optional<Tensor>& c) {
    TORCH_CHECK(h.numel() == L_ * H_, "greedy decoder: h must hold L x H values");
    std::memcpy(h_[parity_].get(), dense(h).data_ptr<float>(), L_ * H_ * sizeof(float));
    if (cell_ == Cell::kLSTM) {
      TORCH_CHECK(c && c->numel() == L_ * H_, "greedy decoder: an LSTM needs c with L x H values");
      std::memcpy(c_.get(), dense(*c).data_ptr<float>(), L_ * H_ * sizeof(float));
    }
  }

  std::vector<Tensor> state() const {
    Tensor h = at::empty({L_, H_}, at::kFloat);
    std::memcpy(h.data_ptr<float>(), h_[parity_].get(), L_ * H_ * sizeof(float));
    if (cell_ != Cell::kLSTM) return {h};
    Tensor c = at::empty({L_, H_}, at::kFloat);
    std::memcpy(c.data_ptr<float>(), c_.get(), L_ * H_ * sizeof(float));
    return {h, c};
  }

  // The last step's logits (V,).
  Tensor logits() const {
    Tensor out = at::empty({V_}, at::kFloat);
    std::memcpy(out.data_ptr<float>(), logits_.get(), V_ * sizeof(float));
    return out;
  }

  int64_t slices() const { return static_cast<int64_t>(slices_.size()); }

  // Feeds `first`, then each argmax, for `steps` steps; returns the `steps` argmax tokens. `workers`
  // threads (1 to slices(), the calling thread among them) share the slices; the tokens and logits do
  // not depend on how many.
  std::vector<int64_t> run(int64_t first, int64_t steps, int64_t workers) {
    TORCH_CHECK(first >= 0 && first < V_, "greedy decoder: token ", first, " is outside the vocabulary");
    TORCH_CHECK(steps >= 0, "greedy decoder: steps must be >= 0");
    TORCH_CHECK(workers >= 1 && workers <= slices(), "greedy decoder: workers must be in [1, ", slices(), "]");
    std::vector<int64_t> tokens(steps);
    if (steps == 0) return tokens;
    // Helpers wait for `go` before touching anything: if one cannot be started, the others are told to
    // leave, and the calling thread does the whole run alone.
    std::atomic<int> go{0};
    SpinBarrier barrier(static_cast<int>(workers));
    std::vector<std::thread> helpers;
    helpers.reserve(workers - 1);
    try {
      for (int64_t w = 1; w < workers; ++w) {
        helpers.emplace_back([&, w] {
          int state;
          while ((state = go.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
          if (state > 0) loop(w, workers, barrier, first, steps, tokens.data());
        });
      }
    } catch (const std::exception&) {
      go.store(-1, std::memory_order_release);
      for (auto& th : helpers) th.join();
      helpers.clear();
      return run(first, steps, 1);
    }
    go.store(1, std::memory_order_release);
    loop(0, workers, barrier, first, steps, tokens.data());
    for (auto& th : helpers) th.join();
    parity_ ^= static_cast<int>(steps & 1);
    return tokens;
  }

 private:
  struct Slice {
    int64_t u0 = 0, u1 = 0, v0 = 0, v1 = 0;  // units [u0, u1) of every layer, vocabulary [v0, v1)
    std::vector<Panel> ih, hh;
    std::vector<Floats> b_ih, b_hh;
    Panel out;
    Floats b_out;
    Floats gi, gh, logits;  // scratch for one layer's gates and the slice's logits
  };

  static Floats local_bias(const std::optional<Tensor>& b, const std::vector<int64_t>& rows, int64_t width) {
    Floats out(width);
    if (!b) return out;
    const Tensor bc = dense(*b);
    const float* src = bc.data_ptr<float>();
    for (size_t c = 0; c < rows.size(); ++c) out.get()[c] = src[rows[c]];
    return out;
  }

  // Worker w's part of every step: slices w, w + workers, ...
  void loop(int64_t w, int64_t workers, SpinBarrier& barrier, int64_t token, int64_t steps, int64_t* tokens) {
    int p = parity_;
    for (int64_t step = 0; step < steps; ++step) {
      const int q = p ^ 1;  // this step reads the state at parity p and writes it at q
      for (int64_t l = 0; l < L_; ++l) {
        for (int64_t i = w; i < slices(); i += workers) layer_step(slices_[i], l, token, p, q);
        barrier.wait();
      }
      for (int64_t i = w; i < slices(); i += workers) {
        Slice& s = slices_[i];
        float* __restrict lg = s.logits.get();
        std::memcpy(lg, s.b_out.get(), s.out.width() * sizeof(float));
        s.out.accumulate(x_[q].get() + (L_ - 1) * H_, lg);
        std::memcpy(logits_.get() + s.v0, lg, (s.v1 - s.v0) * sizeof(float));
      }
      barrier.wait();
      token = argmax(logits_.get(), V_);
      if (w == 0) tokens[step] = token;
      p = q;
    }
  }

  // Layer l of slice s: its units' new h (and c) at parity q, and their output x = h (+ the layer's input).
  void layer_step(Slice& s, int64_t l, int64_t token, int p, int q) {
    const int64_t u = s.u1 - s.u0;
    float* __restrict gi = s.gi.get();
    float* __restrict gh = s.gh.get();
    const Panel& ih = s.ih[l];
    std::memcpy(gi, s.b_ih[l].get(), ih.width() * sizeof(float));
    std::memcpy(gh, s.b_hh[l].get(), s.hh[l].width() * sizeof(float));
    const float* in = nullptr;
    if (l > 0) {
      in = x_[q].get() + (l - 1) * H_;
      ih.accumulate(in, gi);
    } else if (emb_ != nullptr) {
      in = emb_ + token * embedding_.size(1);
      ih.accumulate(in, gi);
    } else {
      ih.add_row(token, gi);
    }
    s.hh[l].accumulate(h_[p].get() + l * H_, gh);
    float* __restrict h = h_[q].get() + l * H_ + s.u0;
    float* __restrict x = x_[q].get() + l * H_ + s.u0;
    float* c = c_.get() + l * H_ + s.u0;  // the LSTM's c, updated in place
    deeprnn::cell_step(cell_, u, gi, gh, h_[p].get() + l * H_ + s.u0, c, c, h);
    if (residual_ && l > 0) {
      const float* __restrict below = in + s.u0;
      UNITS_INDEPENDENT
      for (int64_t j = 0; j < u; ++j) x[j] = h[j] + below[j];
    } else {
      std::memcpy(x, h, u * sizeof(float));
    }
  }

  // The first index of the maximum; a NaN counts as the maximum, as in torch.argmax.
  static int64_t argmax(const float* v, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i) {
      if (std::isnan(v[best])) break;
      if (v[i] > v[best] || std::isnan(v[i])) best = i;
    }
    return best;
  }

  const Cell cell_;
  const int64_t G_, L_, H_, V_;
  const bool residual_;
  Tensor embedding_;
  const float* emb_ = nullptr;  // its rows, read by every worker
  std::vector<Slice> slices_;
  Floats h_[2], x_[2], c_, logits_;  // h and the layer outputs x (h + residual) at two parities
  int parity_ = 0;
};

}  // namespace

void register_greedy(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<GreedyDecoder>(m, "GreedyDecoder", "One stream's greedy decoding loop in C++: see greedy.cpp")
      .def(py::init<const std::string&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                    const std::vector<std::optional<Tensor>>&, const std::vector<std::optional<Tensor>>&,
                    const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&, bool, int64_t>(),
           py::arg("cell"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("embedding"),
           py::arg("out_weight"), py::arg("out_bias"), py::arg("residual"), py::arg("slices"))
      .def("set_state", &GreedyDecoder::set_state, py::arg("h"), py::arg("c"))
      .def("state", &GreedyDecoder::state)
      .def("logits", &GreedyDecoder::logits)
      .def("slices", &GreedyDecoder::slices)
      .def("run", &GreedyDecoder::run, py::arg("first"), py::arg("steps"), py::arg("workers"),
           py::call_guard<py::gil_scoped_release>());
}
