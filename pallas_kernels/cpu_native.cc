// DASH-KV's decode step on the CPU as XLA FFI custom calls, each one pass over its input:
//   selection  hamming_histogram (distances and histogram from one read of the codes),
//              distance_histogram, calibrate_distances (in place: the histogram follows the
//              moved slots), select_ranks and select_tiers (two passes per row);
//   attention  gathered_logits and gathered_attention: the rows a slot list names are read in
//              place, by index, and used while in cache. XLA:CPU's own gather moves one element
//              at a time (about 1 ns each), several times the cost of the bytes (RESULTS.md);
//              code_logits: tier 2's logits from the codes read the same way, 16 slots a step.
//
// Same contracts as pallas_kernels/api.py's entries; caches and codes come as stacks
// [L, B, Hkv, N, ...] with an int32 layer, already clipped. Work is split into (batch, KV head,
// block) tasks on XLA's intra-op thread pool; each task's result depends on its inputs only and
// partials merge in a fixed order, so the output does not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 2048;  // slots per task: [G, D] partials stay small, tasks many
constexpr int kPrefetch = 16;     // rows ahead: slot lists are sorted but sparse, so the
                                  // hardware prefetcher cannot follow them
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Runs fn(0) .. fn(n - 1) on the caller and the pool's threads; returns when all are done.
// Helpers that start after every task is claimed touch nothing but the shared counters, so a
// busy pool can never hold the caller up.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));  // a copy each
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done.load() == n; });
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t bf16) {  // bfloat16 is float32's upper half
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Row `slot` of (layer, b, h) in a stack [L, B, Hkv, N, D].
template <typename T>
const T* Row(const T* cache, int64_t layer_bh, int64_t n, int64_t d, int64_t slot) {
  return cache + (layer_bh * n + slot) * d;
}

// Asks for the cache lines of row `slot` (when it names one) ahead of its use, into L2: on
// AMD Zen 4 the scattered sparse step ran 1.44x faster than with prefetches into L1
// (RESULTS.md, issue 15 round 8).
template <typename T>
void Prefetch(const T* cache, int64_t layer_bh, int64_t n, int64_t d, int32_t slot) {
  if (slot < 0 || slot >= n) return;
  const char* row = reinterpret_cast<const char*>(Row(cache, layer_bh, n, d, slot));
  for (int64_t byte = 0; byte < d * int64_t{sizeof(T)}; byte += 64)
    __builtin_prefetch(row + byte, /*rw=*/0, /*locality=*/2);
}

// --- 16-float vectors (GCC vector extensions: AVX-512, AVX2 or SSE, whatever -march gives) ---

typedef float Floats __attribute__((vector_size(64)));     // 16 lanes
typedef int32_t Ints __attribute__((vector_size(64)));     // 16 lanes
typedef uint16_t Halves __attribute__((vector_size(32)));  // 16 lanes
constexpr int64_t kLanes = 16;

inline Floats Load(const float* p) {
  Floats x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline Floats Load(const uint16_t* p) {  // 16 bfloat16: each float32's upper half
  Halves h;
  std::memcpy(&h, p, sizeof(h));
  Ints bits = __builtin_convertvector(h, Ints) << 16;
  Floats x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
inline Ints LoadInts(const int32_t* p) {
  Ints x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void Store(float* p, Floats x) { std::memcpy(p, &x, sizeof(x)); }

inline float Sum(Floats x) {  // halves added until one lane is left: a tree, not a chain
  typedef float F8 __attribute__((vector_size(32)));
  typedef float F4 __attribute__((vector_size(16)));
  F8 x8 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  F4 x4 = __builtin_shufflevector(x8, x8, 0, 1, 2, 3) + __builtin_shufflevector(x8, x8, 4, 5, 6, 7);
  return (x4[0] + x4[2]) + (x4[1] + x4[3]);
}

inline Floats Max(Floats a, Floats b) { return a > b ? a : b; }

// exp(x) lane by lane (Cephes' expf: 2^n times a degree-6 polynomial of the rest; about 1 ulp),
// 0 below -87.3 (where float32's exp would be subnormal) and at -inf.
inline Floats Exp(Floats x) {
  const Floats n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  Floats r = x - n * 0.693359375f;  // ln 2 in two parts: the first exact in float32
  r = r + n * 2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Ints scale = (__builtin_convertvector(n, Ints) + 127) << 23;  // 2^n as float bits
  Floats two_n;
  std::memcpy(&two_n, &scale, sizeof(two_n));
  return x < -87.3f ? Floats{} : p * two_n;
}

// --- gathered_logits: out[b, h, g, e] = scale * q[b, h, g] . k[layer, b, h, slots[b, h, e]] ---

constexpr int64_t kRows = 4;  // rows used together: their FMAs independent, their loads shared

// Rows[r] = row slots[e + r] of a task's block, or `zero` past its end or where no row is
// named; prefetches the rows kPrefetch ahead. Returns which of the kRows name a row.
template <typename T>
int Gather(const T* cache, int64_t layer_bh, int64_t n, int64_t d, const int32_t* slots,
           int64_t e, int64_t stop, const T* zero, const T* (&rows)[kRows]) {
  int named = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    if (e + r + kPrefetch < stop) Prefetch(cache, layer_bh, n, d, slots[e + r + kPrefetch]);
    const int32_t slot = e + r < stop ? slots[e + r] : -1;
    const bool ok = slot >= 0 && slot < n;
    rows[r] = ok ? Row(cache, layer_bh, n, d, slot) : zero;
    named |= ok << r;
  }
  return named;
}

template <typename T>
void Logits(ffi::ThreadPool& pool, const float* q, const T* k, const int32_t* slots, float* out,
            int64_t layer, int64_t batch, int64_t heads, int64_t g_size, int64_t n, int64_t d,
            int64_t e_size, float scale) {
  const int64_t blocks = (e_size + kBlock - 1) / kBlock, full = d / kLanes * kLanes;
  ParallelFor(pool, batch * heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, start = task % blocks * kBlock;
    const int64_t stop = std::min(start + kBlock, e_size);
    const int64_t layer_bh = layer * batch * heads + bh;
    const int32_t* row_slots = slots + bh * e_size;
    const float* q_bh = q + bh * g_size * d;
    float* out_bh = out + bh * g_size * e_size;
    const std::vector<T> zero(d);
    for (int64_t e = start; e < stop; e += kRows) {
      const T* rows[kRows];
      const int named = Gather(k, layer_bh, n, d, row_slots, e, stop, zero.data(), rows);
      for (int64_t g = 0; g < g_size; ++g) {
        const float* q_g = q_bh + g * d;
        Floats acc[kRows] = {};
        float tail[kRows] = {};
        for (int64_t i = 0; i < full; i += kLanes) {
          const Floats q_i = Load(q_g + i);
          for (int64_t r = 0; r < kRows; ++r) acc[r] += q_i * Load(rows[r] + i);
        }
        for (int64_t i = full; i < d; ++i)
          for (int64_t r = 0; r < kRows; ++r) tail[r] += q_g[i] * ToFloat(rows[r][i]);
        for (int64_t r = 0; r < kRows && e + r < stop; ++r)
          out_bh[g * e_size + e + r] = named >> r & 1 ? scale * (Sum(acc[r]) + tail[r]) : kNegInf;
      }
    }
  });
}

// --- gathered_attention: softmax over a list's logits times the V rows it names --------------

// One task's share of a row: flash-decoding partials over its block of slots.
struct Partial {
  std::vector<float> shift, total, acc;  // [G], [G], [G, D]
};

// A task's logits [G, stop - start] as weights exp(logit - shift[g]) into weights [G, kBlock],
// 0 where the slot names no row or the logit is -inf; sets shift and total per query.
void Weights(const float* logits, const int32_t* slots, int64_t start, int64_t stop, int64_t n,
             int64_t g_size, int64_t m_size, Partial& part, float* weights) {
  auto named = [&](int64_t e) { return slots[e] >= 0 && slots[e] < n; };
  const int64_t full = start + (stop - start) / kLanes * kLanes;
  // Named: -1 < slot <= the last row (in int32, as the slots are).
  const int32_t last_row = static_cast<int32_t>(
      std::min<int64_t>(n - 1, std::numeric_limits<int32_t>::max()));
  const Ints none = Ints{} - 1, last = Ints{} + last_row;
  auto named_lanes = [&](int64_t e) {  // the 16 slots from e that name a row
    const Ints s = LoadInts(slots + e);
    return (s > none) & (s <= last);
  };
  for (int64_t g = 0; g < g_size; ++g) {
    const float* logits_g = logits + g * m_size;
    float* weights_g = weights + g * kBlock - start;
    Floats shift = Floats{} + kNegInf;
    for (int64_t e = start; e < full; e += kLanes)
      shift = Max(shift, named_lanes(e) ? Load(logits_g + e) : kNegInf);
    float shift_g = kNegInf;
    for (int64_t i = 0; i < kLanes; ++i) shift_g = std::max(shift_g, shift[i]);
    for (int64_t e = full; e < stop; ++e)
      if (named(e)) shift_g = std::max(shift_g, logits_g[e]);
    Floats total = {};
    for (int64_t e = start; e < full; e += kLanes) {
      const Floats l = Load(logits_g + e);
      // A -inf logit (or a group with no finite one) weighs nothing.
      const Floats w = named_lanes(e) & (l > kNegInf) ? Exp(l - shift_g) : Floats{};
      Store(weights_g + e, w);
      total += w;
    }
    float total_g = Sum(total);
    for (int64_t e = full; e < stop; ++e) {
      const bool counts = named(e) && logits_g[e] > kNegInf;
      weights_g[e] = counts ? Exp(Floats{} + (logits_g[e] - shift_g))[0] : 0.0f;
      total_g += weights_g[e];
    }
    part.shift[g] = shift_g;
    part.total[g] = total_g;
  }
}

template <typename T>
void Attention(ffi::ThreadPool& pool, const float* logits, const T* v, const int32_t* slots,
               float* out, float* lse, int64_t layer, int64_t batch, int64_t heads,
               int64_t g_size, int64_t n, int64_t d, int64_t m_size) {
  const int64_t blocks = (m_size + kBlock - 1) / kBlock, full = d / kLanes * kLanes;
  std::vector<Partial> partials(batch * heads * blocks);
  ParallelFor(pool, batch * heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, start = task % blocks * kBlock;
    const int64_t stop = std::min(start + kBlock, m_size);
    const int64_t layer_bh = layer * batch * heads + bh;
    const int32_t* row_slots = slots + bh * m_size;
    Partial& part = partials[task];
    part.shift.assign(g_size, kNegInf);
    part.total.assign(g_size, 0.0f);
    part.acc.assign(g_size * d, 0.0f);
    std::vector<float> weights(g_size * kBlock);  // [G, kBlock]
    Weights(logits + bh * g_size * m_size, row_slots, start, stop, n, g_size, m_size, part,
            weights.data());
    const std::vector<T> zero(d);
    for (int64_t e = start; e < stop; e += kRows) {
      const T* rows[kRows];
      Gather(v, layer_bh, n, d, row_slots, e, stop, zero.data(), rows);
      const float* w = weights.data() + (e - start);  // w[g * kBlock + r]: 0 past the end
      bool any = false;
      for (int64_t r = 0; r < kRows; ++r) {
        bool weighed = false;
        for (int64_t g = 0; g < g_size; ++g) weighed |= w[g * kBlock + r] != 0.0f;
        if (!weighed) rows[r] = zero.data();  // a row no query weighs is not read
        any |= weighed;
      }
      if (!any) continue;
      for (int64_t i = 0; i < full; i += kLanes) {
        Floats row_i[kRows];
        for (int64_t r = 0; r < kRows; ++r) row_i[r] = Load(rows[r] + i);
        for (int64_t g = 0; g < g_size; ++g) {
          float* acc = part.acc.data() + g * d + i;
          Floats sum = Load(acc);
          for (int64_t r = 0; r < kRows; ++r) sum += w[g * kBlock + r] * row_i[r];
          Store(acc, sum);
        }
      }
      for (int64_t i = full; i < d; ++i)
        for (int64_t g = 0; g < g_size; ++g)
          for (int64_t r = 0; r < kRows; ++r)
            part.acc[g * d + i] += w[g * kBlock + r] * ToFloat(rows[r][i]);
    }
  });
  // Merge each row's partials in block order: the same sums whatever thread ran which block.
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    for (int64_t g = 0; g < g_size; ++g) {
      float shift = kNegInf;
      for (int64_t blk = 0; blk < blocks; ++blk)
        shift = std::max(shift, partials[bh * blocks + blk].shift[g]);
      float* out_g = out + (bh * g_size + g) * d;
      std::fill(out_g, out_g + d, 0.0f);
      if (shift == kNegInf) {  // no valid entry, or none with a finite logit
        lse[bh * g_size + g] = kNegInf;
        continue;
      }
      float total = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const Partial& part = partials[bh * blocks + blk];
        if (part.shift[g] == kNegInf) continue;
        const float rescale = std::exp(part.shift[g] - shift);
        total += rescale * part.total[g];
        for (int64_t i = 0; i < d; ++i) out_g[i] += rescale * part.acc[g * d + i];
      }
      for (int64_t i = 0; i < d; ++i) out_g[i] /= total;
      lse[bh * g_size + g] = shift + std::log(total);
    }
  }
}

// --- code_logits: tier 2's approximate logits from the codes a slot list names ---------------
//   out[b, h, g, e] = scale[h, g] (1 - 2 popcount(q_g XOR k) / bits) + w2 . gelu(x w1 + b1) + b2,
//   k = codes[layer, b, h, slots[b, h, e]], x_j = 2 (share of equal bits in group j) - 1.

// jax.nn.gelu's tanh form, 0.5 x (1 + tanh(z)) with z = sqrt(2 / pi) (x + 0.044715 x^3), as
// x / (1 + e^-2z) (the same function: one exp and one division).
inline Floats Gelu(Floats x) {
  Floats minus_2z = -1.5957691216057308f * (x + 0.044715f * x * x * x);
  minus_2z = minus_2z > 80.0f ? Floats{} + 80.0f : minus_2z;  // e^80 + 1 still finite: gelu -> 0
  return x / (1.0f + Exp(minus_2z));
}

// The MLP, widths [groups, hidden, 1]: w1 [groups, hidden], b1 [hidden], w2 [hidden], b2 [1].
struct CodeMlp {
  const float *w1, *b1, *w2, *b2;
  int64_t groups, hidden;
};

typedef uint32_t Words __attribute__((vector_size(64)));  // 16 lanes

// Per lane, the set bits of each `width`-bit field of x (width a power of two <= 32), in place:
// the SWAR popcount's stages, stopped at the field width.
inline Words FieldCounts(Words x, int64_t width) {
  if (width >= 2) x = x - ((x >> 1) & 0x55555555u);
  if (width >= 4) x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  if (width >= 8) x = (x + (x >> 4)) & 0x0F0F0F0Fu;
  if (width >= 16) x = (x + (x >> 8)) & 0x00FF00FFu;
  if (width >= 32) x = (x + (x >> 16)) & 0x0000FFFFu;
  return x;
}

constexpr int64_t kCodesAhead = 64;  // slots whose codes are asked for ahead: rows of 16 bytes

void CodeLogits(ffi::ThreadPool& pool, const uint32_t* q, const uint32_t* codes,
                const int32_t* slots, const float* scale, const CodeMlp& mlp, float* out,
                int64_t layer, int64_t batch, int64_t heads, int64_t g_size, int64_t n,
                int64_t words, int64_t e_size) {
  const int64_t blocks = (e_size + kBlock - 1) / kBlock, bits = 32 * words;
  const int64_t group_bits = bits / mlp.groups, width = std::min<int64_t>(group_bits, 32);
  const int64_t fields = 32 / width;  // groups (or parts of one) per word
  const uint32_t field_mask = width == 32 ? ~0u : (1u << width) - 1;
  ParallelFor(pool, batch * heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, h = bh % heads, start = task % blocks * kBlock;
    const int64_t stop = std::min(start + kBlock, e_size);
    const uint32_t* codes_bh = codes + (layer * batch * heads + bh) * n * words;
    const int32_t* row_slots = slots + bh * e_size;
    // Sixteen slots at a time, one lane each: their codes [W][16], each query's per-group
    // equal-bit counts [groups][16], then the MLP, all in 16-lane vectors.
    std::vector<uint32_t> lanes_codes(words * kLanes);
    std::vector<Floats> x(mlp.groups);
    for (int64_t e = start; e < stop; e += kLanes) {
      const int64_t lanes = std::min(kLanes, stop - e);
      const int64_t ahead_stop = std::min(e + kCodesAhead + kLanes, stop);
      for (int64_t ahead = e + kCodesAhead; ahead < ahead_stop; ++ahead)
        Prefetch(codes_bh, 0, n, words, row_slots[ahead]);
      bool named[kLanes];
      for (int64_t lane = 0; lane < kLanes; ++lane) {  // unused lanes: code 0, output -inf
        const int32_t slot = lane < lanes ? row_slots[e + lane] : -1;
        named[lane] = slot >= 0 && slot < n;
        for (int64_t w = 0; w < words; ++w)
          lanes_codes[w * kLanes + lane] = named[lane] ? codes_bh[int64_t{slot} * words + w] : 0;
      }
      for (int64_t g = 0; g < g_size; ++g) {
        const uint32_t* q_g = q + (bh * g_size + g) * words;
        std::fill(x.begin(), x.end(), Floats{});
        for (int64_t w = 0; w < words; ++w) {
          Words k;
          std::memcpy(&k, &lanes_codes[w * kLanes], sizeof(k));
          const Words counts = FieldCounts(~(q_g[w] ^ k), width);
          for (int64_t f = 0; f < fields; ++f)
            x[(w * 32 + f * width) / group_bits] +=
                __builtin_convertvector((counts >> (f * width)) & field_mask, Floats);
        }
        Floats equal = {};  // equal bits over all groups: b - the hamming distance
        for (int64_t j = 0; j < mlp.groups; ++j) {
          equal += x[j];
          x[j] = 2.0f * x[j] / static_cast<float>(group_bits) - 1.0f;  // in [-1, 1]
        }
        const Floats differ = static_cast<float>(bits) - equal;
        const Floats similarity = 1.0f - 2.0f * differ / static_cast<float>(bits);
        // Hidden units four at a time: four independent chains of multiply-adds.
        Floats residual = Floats{} + mlp.b2[0];
        for (int64_t o = 0; o < mlp.hidden; o += 4) {
          const int64_t units = std::min<int64_t>(4, mlp.hidden - o);
          Floats hidden[4];
          for (int64_t u = 0; u < 4; ++u) hidden[u] = Floats{} + (u < units ? mlp.b1[o + u] : 0);
          for (int64_t j = 0; j < mlp.groups; ++j) {
            const float* w = mlp.w1 + j * mlp.hidden + o;
            for (int64_t u = 0; u < 4; ++u) hidden[u] += (u < units ? w[u] : 0.0f) * x[j];
          }
          for (int64_t u = 0; u < units; ++u) residual += mlp.w2[o + u] * Gelu(hidden[u]);
        }
        const Floats logit = scale[h * g_size + g] * similarity + residual;
        float* out_g = out + (bh * g_size + g) * e_size + e;
        for (int64_t lane = 0; lane < lanes; ++lane)
          out_g[lane] = named[lane] ? logit[lane] : kNegInf;
      }
    }
  });
}

// --- hamming_histogram: D = sum_g popcount(q_g XOR k) over [lo, hi), and its histogram ------

constexpr int64_t kScanBlock = 1 << 16;  // slots per task: 1 MB of 128-bit codes
constexpr int64_t kCountChunk = 2048;  // slots whose distances are counted at once (8 KB)
constexpr int32_t kSentinel = std::numeric_limits<int32_t>::max();

// Counts values in [0, bins) (others in an overflow bin, dropped) over four interleaved
// sub-histograms: a run of equal values would otherwise wait on each increment's store.
class Counter {
 public:
  explicit Counter(int64_t bins) : bins_(bins), sub_(4 * (bins + 1), 0) {}

  void Add(const int32_t* values, int64_t n) {
    int32_t* sub = sub_.data();
    const int64_t stride = bins_ + 1;
    auto bin = [this](int32_t v) { return static_cast<uint32_t>(v) < bins_ ? v : bins_; };
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (int64_t k = 0; k < 4; ++k) ++sub[k * stride + bin(values[i + k])];
    for (; i < n; ++i) ++sub[bin(values[i])];
  }

  void AddTo(int32_t* hist) const {
    for (int64_t k = 0; k < 4; ++k)
      for (int64_t j = 0; j < bins_; ++j) hist[j] += sub_[k * (bins_ + 1) + j];
  }

 private:
  int64_t bins_;
  std::vector<int32_t> sub_;  // [4, bins + 1]
};

// Distances of `count` slots' codes against the group's queries into out, W words per code of
// type Word. 64 bytes of codes at a time against the queries repeated to 64 bytes (W divides
// them): one vector XOR and popcount per query on AVX-512, where a word per step compiles to
// scalar code; 64-bit words leave half the per-slot sums to add.
template <typename Word, int64_t W>
void Distances(const Word* q, int64_t g_size, const Word* codes, int64_t count, int32_t* out) {
  constexpr int64_t kWide = 64 / sizeof(Word), kKeys = kWide / W;
  Word pattern[8][kWide];  // G <= 8 per block of queries; more are summed block by block
  std::fill(out, out + count, 0);
  for (int64_t g0 = 0; g0 < g_size; g0 += 8) {
    const int64_t groups = std::min<int64_t>(8, g_size - g0);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < kWide; ++i) pattern[g][i] = q[(g0 + g) * W + i % W];
    int64_t slot = 0;
    for (; slot + kKeys <= count; slot += kKeys) {
      const Word* key = codes + slot * W;
      Word bits[kWide] = {};
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < kWide; ++i) bits[i] += __builtin_popcountll(pattern[g][i] ^ key[i]);
      for (int64_t j = 0; j < kKeys; ++j)
        for (int64_t w = 0; w < W; ++w) out[slot + j] += static_cast<int32_t>(bits[j * W + w]);
    }
    for (; slot < count; ++slot)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t w = 0; w < W; ++w)
          out[slot] += __builtin_popcountll(pattern[g][w] ^ codes[slot * W + w]);
  }
}

// Any word count: one word at a time.
void DistancesAnyWords(const uint32_t* q, int64_t g_size, int64_t words, const uint32_t* codes,
                       int64_t count, int32_t* out) {
  for (int64_t slot = 0; slot < count; ++slot) {
    int32_t d = 0;
    for (int64_t g = 0; g < g_size; ++g)
      for (int64_t w = 0; w < words; ++w)
        d += __builtin_popcount(q[g * words + w] ^ codes[slot * words + w]);
    out[slot] = d;
  }
}

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
// Indices of the even and odd 32-bit lanes of two vectors taken as one of 32 lanes.
inline __m512i EvenLanes() {
  return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}
inline __m512i OddLanes() { return _mm512_add_epi32(EvenLanes(), _mm512_set1_epi32(1)); }

// Lane i of the result = lanes 2i and 2i + 1 of (a, b) added: each key's words summed pairwise.
inline __m512i AddPairs(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, EvenLanes(), b),
                          _mm512_permutex2var_epi32(a, OddLanes(), b));
}

// `Distances` 16 slots at a time, W 64-bit words per code: 2W vectors of eight words, each
// word's popcount summed over the queries, narrowed to 32 bits and summed per key by permutes,
// then one 16-lane store (the portable loop ends each 64 bytes in scalar sums per slot).
template <int64_t W>
void DistancesAvx512(const uint64_t* q, int64_t g_size, const uint64_t* codes, int64_t count,
                     int32_t* out) {
  static_assert(W == 1 || W == 2 || W == 4);
  std::vector<uint64_t> pattern(g_size * 8);  // each query's words repeated to 64 bytes
  for (int64_t g = 0; g < g_size; ++g)
    for (int64_t i = 0; i < 8; ++i) pattern[g * 8 + i] = q[g * W + i % W];
  int64_t slot = 0;
  for (; slot + 16 <= count; slot += 16) {
    // 2W vectors of eight words (the 16 keys' words, in order), each word's popcount summed over
    // the queries: constant indices only, so that all of it stays in registers.
    __m512i keys[2 * W], sums[2 * W];
#pragma GCC unroll 8
    for (int64_t j = 0; j < 2 * W; ++j) {
      keys[j] = _mm512_loadu_si512(codes + slot * W + j * 8);
      sums[j] = _mm512_setzero_si512();
    }
    for (int64_t g = 0; g < g_size; ++g) {
      const __m512i query = _mm512_loadu_si512(pattern.data() + g * 8);
#pragma GCC unroll 8
      for (int64_t j = 0; j < 2 * W; ++j)
        sums[j] = _mm512_add_epi64(sums[j], _mm512_popcnt_epi64(_mm512_xor_si512(query, keys[j])));
    }
    // Popcount sums fit 32 bits: the low halves of each pair of vectors' 64-bit lanes, in order.
#pragma GCC unroll 4
    for (int64_t v = 0; v < W; ++v)
      sums[v] = _mm512_permutex2var_epi32(sums[2 * v], EvenLanes(), sums[2 * v + 1]);
#pragma GCC unroll 4
    for (int64_t width = W; width > 1; width /= 2)
#pragma GCC unroll 4
      for (int64_t i = 0; i < width / 2; ++i) sums[i] = AddPairs(sums[2 * i], sums[2 * i + 1]);
    _mm512_storeu_si512(out + slot, sums[0]);
  }
  // The last count % 16 slots, a uint32 word at a time.
  DistancesAnyWords(reinterpret_cast<const uint32_t*>(q), g_size, 2 * W,
                    reinterpret_cast<const uint32_t*>(codes + slot * W), count - slot, out + slot);
}
#endif

// Distances of `count` codes of `words` uint32 words each, by the fastest loop for the width:
// pairs of uint32 words read as one uint64 (XLA's buffers are 64-byte aligned, words even).
void Distances(const uint32_t* q, int64_t g_size, const uint32_t* codes, int64_t count,
               int64_t words, int32_t* out) {
  const uint64_t* wide_q = reinterpret_cast<const uint64_t*>(q);
  const uint64_t* wide_codes = reinterpret_cast<const uint64_t*>(codes);
  switch (words) {
    case 1: return Distances<uint32_t, 1>(q, g_size, codes, count, out);
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    case 2: return DistancesAvx512<1>(wide_q, g_size, wide_codes, count, out);
    case 4: return DistancesAvx512<2>(wide_q, g_size, wide_codes, count, out);
    case 8: return DistancesAvx512<4>(wide_q, g_size, wide_codes, count, out);
#else
    case 2: return Distances<uint64_t, 1>(wide_q, g_size, wide_codes, count, out);
    case 4: return Distances<uint64_t, 2>(wide_q, g_size, wide_codes, count, out);
    case 8: return Distances<uint64_t, 4>(wide_q, g_size, wide_codes, count, out);
#endif
    default: return DistancesAnyWords(q, g_size, words, codes, count, out);
  }
}

// Sums per-block histograms partial [rows * blocks, bins] into hist [rows, bins].
void MergeHistograms(const std::vector<int32_t>& partial, int64_t rows, int64_t blocks,
                     int64_t bins, int32_t* hist) {
  for (int64_t row = 0; row < rows; ++row) {
    int32_t* out = hist + row * bins;
    std::fill(out, out + bins, 0);
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t j = 0; j < bins; ++j) out[j] += partial[(row * blocks + blk) * bins + j];
  }
}

void HammingHistogram(ffi::ThreadPool& pool, const uint32_t* q, const uint32_t* k,
                      const int32_t* lo, const int32_t* hi, int32_t* distances, int32_t* hist,
                      int64_t layer, int64_t batch, int64_t heads, int64_t g_size, int64_t n,
                      int64_t words) {
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  const int64_t bins = g_size * words * 32 + 1;
  std::vector<int32_t> partial(batch * heads * blocks * bins, 0);
  ParallelFor(pool, batch * heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, b = bh / heads;
    const int64_t start = task % blocks * kScanBlock, stop = std::min(start + kScanBlock, n);
    const int64_t first = std::clamp<int64_t>(lo[b], start, stop);
    const int64_t last = std::clamp<int64_t>(hi[b], first, stop);
    const uint32_t* codes = k + ((layer * batch * heads + bh) * n + first) * words;
    const uint32_t* q_bh = q + bh * g_size * words;
    int32_t* out = distances + bh * n;
    std::fill(out + start, out + first, kSentinel);
    // Chunk by chunk, so that each chunk's distances are counted while still in L1.
    Counter counter(bins);
    for (int64_t chunk = first; chunk < last; chunk += kCountChunk) {
      const int64_t count = std::min(kCountChunk, last - chunk);
      Distances(q_bh, g_size, codes + (chunk - first) * words, count, words, out + chunk);
      counter.Add(out + chunk, count);
    }
    std::fill(out + last, out + stop, kSentinel);
    counter.AddTo(partial.data() + task * bins);
  });
  MergeHistograms(partial, batch * heads, blocks, bins, hist);
}

// distance_histogram: each row's values in [0, bins) counted by blocks of kScanBlock slots.
void DistanceHistogram(ffi::ThreadPool& pool, const int32_t* distances, int32_t* hist,
                       int64_t rows, int64_t n, int64_t bins) {
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  std::vector<int32_t> partial(rows * blocks * bins, 0);
  ParallelFor(pool, rows * blocks, [&](int64_t task) {
    const int64_t row = task / blocks, start = task % blocks * kScanBlock;
    const int64_t stop = std::min(start + kScanBlock, n);
    Counter counter(bins);
    counter.Add(distances + row * n + start, stop - start);
    counter.AddTo(partial.data() + task * bins);
  });
  MergeHistograms(partial, rows, blocks, bins, hist);
}

// --- index lists: the positions of the values a test keeps, for calibration and selection -----

// Writes to out the indices i in [start, stop) with values[i] <= bound (kAtMost) or != 0
// (kNonZero), ascending, and returns their count; out has room for stop - start + 16. AVX-512
// compresses 16 indices per step; elsewhere a branch-free loop (an index is written always and
// kept by advancing past it).
enum class Keep { kAtMost, kNonZero };

template <Keep kKeep>
int64_t KeepIndices(const int32_t* values, int64_t start, int64_t stop, int32_t bound,
                    int32_t* out) {
  int64_t m = 0, i = start;
#ifdef __AVX512F__
  const __m512i limit = _mm512_set1_epi32(bound), sixteen = _mm512_set1_epi32(16);
  __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(start)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                     14, 15));
  for (; i + 16 <= stop; i += 16) {
    const __m512i x = _mm512_loadu_si512(values + i);
    const __mmask16 keep = kKeep == Keep::kAtMost
                               ? _mm512_cmple_epi32_mask(x, limit)
                               : _mm512_cmpneq_epi32_mask(x, _mm512_setzero_si512());
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(keep, index));
    m += __builtin_popcount(keep);
    index = _mm512_add_epi32(index, sixteen);
  }
#endif
  for (; i < stop; ++i) {
    out[m] = static_cast<int32_t>(i);
    m += kKeep == Keep::kAtMost ? values[i] <= bound : values[i] != 0;
  }
  return m;
}

// --- calibrate_distances: DASH-KV's consensus and momentum discounts, in place ---------------

// Per (batch row, block of slots): the block's discounts in a local array (the KV heads' vote,
// then the momentum weights summed in list order, as XLA's scatter adds them), then each slot
// with a discount moved in every head and the histogram by the moves. Without the vote, the
// only distances read are the discounted slots'.
constexpr int64_t kCalibrateBlock = 1 << 14;

struct Vote {
  const int32_t* thresholds;  // [B, Hkv]; null: no consensus
  int32_t t_vote, units;
};

struct Momentum {
  const int32_t* slots;  // [B, M]; null: no momentum
  const float* weights;  // [B, M]
  int64_t m;
  float scale;
};

// Each row's momentum list [B, M] bucketed by block of kCalibrateBlock slots, in list order (a
// stable counting sort): the entries of (row b, block k) are listed[first[b * blocks + k] ..),
// with their weights; slots outside [0, n) are dropped. The buckets live in the calling
// thread's storage, reused from call to call: fresh pages would cost more than the sort.
struct Buckets {
  std::vector<int64_t> first;
  std::vector<int32_t> listed;
  std::vector<float> weight;
};

const Buckets& BucketMomentum(const Momentum& momentum, int64_t batch, int64_t n, int64_t blocks) {
  thread_local Buckets out;
  thread_local std::vector<int64_t> next;
  // fn(entry, bucket) for each entry of the list that is kept.
  auto each = [&](auto&& fn) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t e = b * momentum.m; e < (b + 1) * momentum.m; ++e)
        if (const int32_t slot = momentum.slots[e]; slot >= 0 && slot < n)
          fn(e, b * blocks + slot / kCalibrateBlock);
  };
  out.first.assign(batch * blocks + 1, 0);
  each([&](int64_t, int64_t at) { ++out.first[at + 1]; });
  for (int64_t i = 0; i < batch * blocks; ++i) out.first[i + 1] += out.first[i];
  out.listed.resize(out.first.back()), out.weight.resize(out.first.back());
  next.assign(out.first.begin(), out.first.end() - 1);
  each([&](int64_t e, int64_t at) {
    out.listed[next[at]] = momentum.slots[e];
    out.weight[next[at]++] = momentum.weights[e];
  });
  return out;
}

void Calibrate(ffi::ThreadPool& pool, int32_t* distances, int32_t* hist, int64_t batch,
               int64_t heads, int64_t n, int64_t bins, const Vote& vote,
               const Momentum& momentum) {
  const int64_t blocks = (n + kCalibrateBlock - 1) / kCalibrateBlock;
  static const Buckets kNone;
  const Buckets& listed =
      momentum.slots != nullptr ? BucketMomentum(momentum, batch, n, blocks) : kNone;
  // Histogram changes per task, kept as the buckets are; named by reference, since in the
  // tasks a thread_local's name is the pool thread's own.
  thread_local std::vector<int32_t> storage;
  std::vector<int32_t>& moves = storage;
  moves.assign(batch * blocks * heads * bins, 0);
  ParallelFor(pool, batch * blocks, [&](int64_t task) {
    const int64_t b = task / blocks, start = task % blocks * kCalibrateBlock;
    const int64_t size = std::min(kCalibrateBlock, n - start);
    int32_t* rows = distances + b * heads * n + start;  // head h's block at rows + h * n
    thread_local std::vector<int32_t> discount_buffer, slots_buffer;
    thread_local std::vector<float> attention_buffer;
    discount_buffer.assign(kCalibrateBlock, 0);
    int32_t* __restrict discount = discount_buffer.data();
    if (vote.thresholds != nullptr) {
      for (int64_t h = 0; h < heads; ++h) {
        const int32_t* __restrict d = rows + h * n;
        const int32_t t = vote.thresholds[b * heads + h];
        for (int64_t i = 0; i < size; ++i) discount[i] += d[i] <= t;
      }
      const int32_t t_vote = vote.t_vote, units = vote.units;
      for (int64_t i = 0; i < size; ++i) discount[i] = discount[i] >= t_vote ? units : 0;
    }
    if (momentum.slots != nullptr && listed.first[task] < listed.first[task + 1]) {
      attention_buffer.resize(kCalibrateBlock);
      float* attention = attention_buffer.data();
      const int64_t begin = listed.first[task], end = listed.first[task + 1];
      for (int64_t e = begin; e < end; ++e) attention[listed.listed[e] - start] = 0;
      for (int64_t e = begin; e < end; ++e)
        attention[listed.listed[e] - start] += listed.weight[e];
      for (int64_t e = begin; e < end; ++e) {
        const int64_t i = listed.listed[e] - start;
        // jnp.round: half to even, the default rounding mode. Zeroed once used: a slot that
        // the list names twice is discounted once.
        discount[i] += static_cast<int32_t>(std::nearbyint(momentum.scale * attention[i]));
        attention[i] = 0;
      }
    }
    slots_buffer.resize(kCalibrateBlock + 16);
    const int64_t count =
        KeepIndices<Keep::kNonZero>(discount, 0, size, 0, slots_buffer.data());
    int32_t* move = moves.data() + task * heads * bins;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = slots_buffer[j];
      for (int64_t h = 0; h < heads; ++h) {
        int32_t& d = rows[h * n + i];
        if (d == kSentinel) continue;
        const int32_t c = static_cast<int32_t>(
            std::clamp<int64_t>(int64_t{d} - discount[i], 0, bins - 1));
        if (c == d) continue;
        if (d >= 0 && d < bins) --move[h * bins + d];
        ++move[h * bins + c];
        d = c;
      }
    }
  });
  for (int64_t task = 0; task < batch * blocks; ++task) {
    int32_t* out = hist + task / blocks * heads * bins;
    const int32_t* move = moves.data() + task * heads * bins;
    for (int64_t j = 0; j < heads * bins; ++j) out[j] += move[j];
  }
}

// --- select_ranks / select_tiers: the slots of each rank range, ascending ---------------------

// Rank order is (distance, slot): a slot is below rank k, for (T, ties) = rank_threshold(k),
// when D < T, or D == T and fewer than `ties` slots with D == T come before it. Given bounds
// k_0 <= k_1 <= ... <= k_R, range i holds the slots below k_{i+1} and not below k_i.
//
// Two parallel passes over blocks of each row. The first keeps a block's candidates, the slots
// with D <= the largest T (a few percent: the rest are below no bound), and counts per bound
// the candidates with D < T and D == T; a prefix over the blocks then gives each block the ties
// seen before it and each range's write position; the second writes the block's selections.
constexpr int64_t kSelectBlock = 1 << 15;
constexpr int kMaxBounds = 4;

struct BlockCounts {
  int64_t less[kMaxBounds], equal[kMaxBounds];
};

// Slots below bound j among those counted in c: D < T, and the first `cut` ties.
int64_t Below(const BlockCounts& c, int64_t j, int64_t cut) {
  return c.less[j] + std::min(c.equal[j], cut);
}

void SelectRanges(ffi::ThreadPool& pool, const int32_t* distances, const int32_t* thresholds,
                  const int32_t* ties, int32_t* indices, int32_t* counts, int64_t rows,
                  int64_t n, int64_t n_bounds, const std::vector<int64_t>& sizes) {
  const int64_t blocks = (n + kSelectBlock - 1) / kSelectBlock, ranges = n_bounds - 1;
  int64_t width = 0;  // indices [rows, sum of sizes]: range i at offset sum(sizes[:i])
  std::vector<int64_t> base(ranges);
  for (int64_t i = 0; i < ranges; ++i) base[i] = width, width += sizes[i];
  std::vector<BlockCounts> tally(rows * blocks);
  std::vector<std::vector<int32_t>> candidates(rows * blocks);
  ParallelFor(pool, rows * blocks, [&](int64_t task) {
    const int64_t row = task / blocks, start = task % blocks * kSelectBlock;
    const int64_t stop = std::min(start + kSelectBlock, n);
    const int32_t* d = distances + row * n;
    const int32_t* t = thresholds + row * n_bounds;
    const int32_t top = *std::max_element(t, t + n_bounds);
    thread_local std::vector<int32_t> scratch;  // kept between calls: no page faults
    scratch.resize(kSelectBlock + 16);
    const int64_t m = KeepIndices<Keep::kAtMost>(d, start, stop, top, scratch.data());
    std::vector<int32_t>& near = candidates[task];
    near.assign(scratch.begin(), scratch.begin() + m);
    BlockCounts& c = tally[task];
    for (int64_t j = 0; j < n_bounds; ++j) {
      int64_t less = 0, equal = 0;
      for (const int32_t slot : near) less += d[slot] < t[j], equal += d[slot] == t[j];
      c.less[j] = less, c.equal[j] = equal;
    }
  });
  // Per block: the ties seen before it per bound; per row: each range's count and padding.
  std::vector<BlockCounts> before(rows * blocks);
  for (int64_t row = 0; row < rows; ++row) {
    BlockCounts seen = {};
    for (int64_t blk = 0; blk < blocks; ++blk) {
      before[row * blocks + blk] = seen;
      for (int64_t j = 0; j < n_bounds; ++j) {
        seen.less[j] += tally[row * blocks + blk].less[j];
        seen.equal[j] += tally[row * blocks + blk].equal[j];
      }
    }
    auto below = [&](int64_t j) { return Below(seen, j, std::max(ties[row * n_bounds + j], 0)); };
    for (int64_t i = 0; i < ranges; ++i) {  // below k_{i+1} and not below k_i
      // Below-sets are nested: k_{i+1} < k_i leaves the range empty.
      const int64_t taken = std::clamp<int64_t>(below(i + 1) - below(i), 0, sizes[i]);
      counts[row * ranges + i] = static_cast<int32_t>(taken);
      int32_t* out = indices + row * width + base[i];
      std::fill(out + taken, out + sizes[i], -1);
    }
  }
  ParallelFor(pool, rows * blocks, [&](int64_t task) {
    const int64_t row = task / blocks;
    const int32_t* d = distances + row * n;
    const int32_t* t = thresholds + row * n_bounds;
    int64_t seen[kMaxBounds], cut[kMaxBounds], at[kMaxBounds];
    for (int64_t j = 0; j < n_bounds; ++j) {
      seen[j] = before[task].equal[j];
      cut[j] = std::max(ties[row * n_bounds + j], 0);
    }
    auto below_before = [&](int64_t j) { return Below(before[task], j, cut[j]); };
    for (int64_t i = 0; i < ranges; ++i) at[i] = below_before(i + 1) - below_before(i);
    int32_t* out = indices + row * width;
    for (const int32_t slot : candidates[task]) {
      bool below[kMaxBounds];
      for (int64_t j = 0; j < n_bounds; ++j) {
        const bool tie = d[slot] == t[j];
        below[j] = d[slot] < t[j] || (tie && seen[j] < cut[j]);
        seen[j] += tie;
      }
      for (int64_t i = 0; i < ranges; ++i)
        if (below[i + 1] && !below[i] && at[i] < sizes[i]) out[base[i] + at[i]++] = slot;
    }
  });
}

// --- FFI bindings --------------------------------------------------------------------------

// Dimensions of a stack [L, B, Hkv, N, D].
struct Stack {
  int64_t batch, heads, n, d;
};

Stack StackDims(const ffi::AnyBuffer& cache) {
  auto dims = cache.dimensions();
  return {dims[1], dims[2], dims[3], dims[4]};
}

ffi::Error GatheredLogitsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                              ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> layer,
                              float scale, ffi::ResultBuffer<ffi::F32> out) {
  if (k.dimensions().size() != 5) return ffi::Error::InvalidArgument("k: want [L, B, Hkv, N, D]");
  const Stack s = StackDims(k);
  const int64_t g_size = q.dimensions()[2], e_size = slots.dimensions()[2];
  const int64_t at = layer.typed_data()[0];
  if (k.element_type() == ffi::F32) {
    Logits(pool, q.typed_data(), k.typed_data<float>(), slots.typed_data(), out->typed_data(),
           at, s.batch, s.heads, g_size, s.n, s.d, e_size, scale);
  } else if (k.element_type() == ffi::BF16) {
    Logits(pool, q.typed_data(), reinterpret_cast<const uint16_t*>(k.untyped_data()),
           slots.typed_data(), out->typed_data(), at, s.batch, s.heads, g_size, s.n, s.d,
           e_size, scale);
  } else {
    return ffi::Error::InvalidArgument("k: want float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error GatheredAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                                 ffi::AnyBuffer v, ffi::Buffer<ffi::S32> slots,
                                 ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out,
                                 ffi::ResultBuffer<ffi::F32> lse) {
  if (v.dimensions().size() != 5) return ffi::Error::InvalidArgument("v: want [L, B, Hkv, N, D]");
  const Stack s = StackDims(v);
  const int64_t g_size = logits.dimensions()[2], m_size = slots.dimensions()[2];
  const int64_t at = layer.typed_data()[0];
  if (v.element_type() == ffi::F32) {
    Attention(pool, logits.typed_data(), v.typed_data<float>(), slots.typed_data(),
              out->typed_data(), lse->typed_data(), at, s.batch, s.heads, g_size, s.n, s.d,
              m_size);
  } else if (v.element_type() == ffi::BF16) {
    Attention(pool, logits.typed_data(), reinterpret_cast<const uint16_t*>(v.untyped_data()),
              slots.typed_data(), out->typed_data(), lse->typed_data(), at, s.batch, s.heads,
              g_size, s.n, s.d, m_size);
  } else {
    return ffi::Error::InvalidArgument("v: want float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error CodeLogitsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> q,
                          ffi::Buffer<ffi::U32> codes, ffi::Buffer<ffi::S32> slots,
                          ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                          ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                          ffi::ResultBuffer<ffi::F32> out) {
  if (codes.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("codes: want [L, B, Hkv, N, W]");
  auto dims = codes.dimensions();
  const int64_t g_size = q.dimensions()[2], e_size = slots.dimensions()[2];
  const CodeMlp mlp{w1.typed_data(), b1.typed_data(), w2.typed_data(), b2.typed_data(),
                    w1.dimensions()[0], w1.dimensions()[1]};
  CodeLogits(pool, q.typed_data(), codes.typed_data(), slots.typed_data(), scale.typed_data(),
             mlp, out->typed_data(), layer.typed_data()[0], dims[1], dims[2], g_size, dims[3],
             dims[4], e_size);
  return ffi::Error::Success();
}

ffi::Error HammingHistogramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> q,
                                ffi::Buffer<ffi::U32> k, ffi::Buffer<ffi::S32> lo,
                                ffi::Buffer<ffi::S32> hi, ffi::Buffer<ffi::S32> layer,
                                ffi::ResultBuffer<ffi::S32> distances,
                                ffi::ResultBuffer<ffi::S32> hist) {
  auto dims = k.dimensions();
  if (dims.size() != 5) return ffi::Error::InvalidArgument("k: want [L, B, Hkv, N, W]");
  HammingHistogram(pool, q.typed_data(), k.typed_data(), lo.typed_data(), hi.typed_data(),
                   distances->typed_data(), hist->typed_data(), layer.typed_data()[0], dims[1],
                   dims[2], q.dimensions()[2], dims[3], dims[4]);
  return ffi::Error::Success();
}

ffi::Error DistanceHistogramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> distances,
                                 ffi::ResultBuffer<ffi::S32> hist) {
  auto dims = distances.dimensions();
  DistanceHistogram(pool, distances.typed_data(), hist->typed_data(), dims[0] * dims[1], dims[2],
                    hist->dimensions()[2]);
  return ffi::Error::Success();
}

ffi::Error CalibrateDistancesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> distances,
                                  ffi::Buffer<ffi::S32> hist, ffi::Buffer<ffi::S32> thresholds,
                                  ffi::Buffer<ffi::S32> t_vote, ffi::Buffer<ffi::S32> units,
                                  ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> weights,
                                  ffi::Buffer<ffi::F32> scale, bool consensus, bool momentum,
                                  ffi::ResultBuffer<ffi::S32> distances_out,
                                  ffi::ResultBuffer<ffi::S32> hist_out) {
  if (distances_out->typed_data() != distances.typed_data() ||
      hist_out->typed_data() != hist.typed_data())
    return ffi::Error::InvalidArgument("calibrate: outputs must alias distances and histogram");
  auto dims = distances.dimensions();
  const Vote vote = {consensus ? thresholds.typed_data() : nullptr, t_vote.typed_data()[0],
                     units.typed_data()[0]};
  const Momentum listed = {momentum ? slots.typed_data() : nullptr, weights.typed_data(),
                           slots.dimensions()[1], scale.typed_data()[0]};
  Calibrate(pool, distances_out->typed_data(), hist_out->typed_data(), dims[0], dims[1], dims[2],
            hist.dimensions()[2], vote, listed);
  return ffi::Error::Success();
}

ffi::Error SelectRangesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> distances,
                            ffi::Buffer<ffi::S32> thresholds, ffi::Buffer<ffi::S32> ties,
                            ffi::Span<const int64_t> sizes, ffi::ResultBuffer<ffi::S32> indices,
                            ffi::ResultBuffer<ffi::S32> counts) {
  auto dims = distances.dimensions();
  const int64_t n_bounds = thresholds.dimensions()[2];
  if (n_bounds < 2 || n_bounds > kMaxBounds || static_cast<int64_t>(sizes.size()) != n_bounds - 1)
    return ffi::Error::InvalidArgument("select: want 2 to 4 bounds and one size per range");
  SelectRanges(pool, distances.typed_data(), thresholds.typed_data(), ties.typed_data(),
               indices->typed_data(), counts->typed_data(), dims[0] * dims[1], dims[2], n_bounds,
               std::vector<int64_t>(sizes.begin(), sizes.end()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvHammingHistogram, HammingHistogramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // q [B, Hkv, G, W]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // k [L, B, Hkv, N, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lo [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // hi [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::Buffer<ffi::S32>>()    // distances [B, Hkv, N]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // histogram [B, Hkv, G b + 1]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvDistanceHistogram, DistanceHistogramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()    // distances [B, Hkv, N]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // histogram [B, Hkv, bins]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvCalibrateDistances, CalibrateDistancesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // distances [B, Hkv, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // histogram [B, Hkv, bins]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // vote thresholds [B, Hkv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // t_vote []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // consensus discount []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // momentum slots [B, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // momentum weights [B, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // momentum scale []
                                  .Attr<bool>("consensus")
                                  .Attr<bool>("momentum")
                                  .Ret<ffi::Buffer<ffi::S32>>()    // distances, in place
                                  .Ret<ffi::Buffer<ffi::S32>>());  // histogram, in place

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvSelectRanges, SelectRangesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // distances [B, Hkv, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // thresholds [B, Hkv, R + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ties [B, Hkv, R + 1]
                                  .Attr<ffi::Span<const int64_t>>("sizes")  // [R]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // indices [B, Hkv, sum sizes]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // counts [B, Hkv, R]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvGatheredLogits, GatheredLogitsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, Hkv, G, D]
                                  .Arg<ffi::AnyBuffer>()         // k [L, B, Hkv, N, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots [B, Hkv, E]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [B, Hkv, G, E]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvGatheredAttention, GatheredAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits [B, Hkv, G, M]
                                  .Arg<ffi::AnyBuffer>()         // v [L, B, Hkv, N, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots [B, Hkv, M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out [B, Hkv, G, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [B, Hkv, G]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DashkvCodeLogits, CodeLogitsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // q codes [B, Hkv, G, W]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // codes [L, B, Hkv, N, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots [B, Hkv, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [Hkv, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1 [groups, hidden]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1 [hidden]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2 [hidden]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 [1]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [B, Hkv, G, K]
