// pali_kit's int4 one-row product on x86-64 CPUs with AVX-512 BF16, as an XLA FFI handler.
// Compiled on first use by pali_kit.native (the system C++ compiler, jaxlib's FFI headers).
//
// y[o] = sum_b sum_{g in block b} s[o, g] * sum_{j < 32} (x[64 g + 2 j] * lo(byte j of group g)
//                                                        + x[64 g + 2 j + 1] * hi(byte j))
//   x       bfloat16[2 R]: the input row, R = the row's packed bytes over all blocks
//   s       float32[O, R / 32]: one scale per 64 inputs (32 bytes), all blocks
//   blocks  int8[O, B_b], one operand each, in order: the row's column blocks, B_b a multiple
//           of 32, sum B_b = R; two's complement nibbles, low = even input, high = odd input
//   y       float32[O]: the blocks' sums added in order (block 0 first)
// Products of bfloat16 inputs and levels (-8..7, exact in bfloat16) are exact in float32;
// vdpbf16ps adds them in pairs into float32 sums (16 lanes), each pair of groups' sums is
// multiplied by the groups' scales and added in float32.
//
// The inner loop reads 64 packed bytes (two groups) as 32 16-bit words, each holding the
// levels of 4 consecutive inputs in its 4 nibbles: shifts by 0 / 4 / 8 / 12 and a vpermw
// (which reads an index's low 5 bits; the table holds the 16 levels twice, so no mask)
// give 4 x 32 levels as bfloat16, against the input rearranged once per call into 4 streams
// per 128 inputs (stream m holds inputs 4 k + m). Words 0-15 are the first group (sum lanes
// 0-7), words 16-31 the second (lanes 8-15): one multiply-add with both scales. A row whose
// block ends in a single group takes it with 256-bit vectors. The rows are read ahead with
// software prefetches (the hardware's prefetchers alone leave the loop waiting on memory).
// Rows are split in chunks between the calling thread and XLA's intra-op thread pool: one
// core is bound by its vector instructions, two reach about the memory's rate
// (bench/quantize.py --forms times the kernel against bfloat16's rate).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPrefetch = 4096;  // bytes ahead of the packed stream (2-8 KB measured alike)

struct Block {
  const int8_t* v;  // int8[O, bytes]
  int64_t bytes;
  int64_t g0;           // first group within the row
  const uint16_t* x;    // this block's inputs, rearranged (2 * bytes)
};

struct Product {
  std::vector<Block> blocks;
  const float* s;
  int64_t groups;  // scales per row
  float* y;
};

inline __m512i levels_table() {
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m256i half = (__m256i)_mm512_cvtneps_pbh(levels);  // exact: small integers
  return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

// Inputs x[0 .. 2 bytes) of one block -> out[2 bytes]: per 128 inputs, stream m (m < 4) holds
// x[4 k + m], k < 32; a last 64 inputs (bytes % 64 == 32): stream m holds x[4 k + m], k < 16.
void rearrange(const uint16_t* x, int64_t bytes, uint16_t* out) {
  __m512i lo[4], hi[4];
  for (int m = 0; m < 4; ++m) {  // lanes k < 16 from words (0, 1), k >= 16 from words (2, 3)
    alignas(64) uint16_t a[32], b[32];
    for (int k = 0; k < 32; ++k) {
      a[k] = static_cast<uint16_t>((4 * k + m) & 63);
      b[k] = static_cast<uint16_t>((4 * (k - 16) + m) & 63);
    }
    lo[m] = _mm512_load_si512(a);
    hi[m] = _mm512_load_si512(b);
  }
  const int64_t n = bytes / 64;
  for (int64_t c = 0; c < n; ++c, x += 128, out += 128) {
    const __m512i a0 = _mm512_loadu_si512(x), a1 = _mm512_loadu_si512(x + 32);
    const __m512i a2 = _mm512_loadu_si512(x + 64), a3 = _mm512_loadu_si512(x + 96);
    for (int m = 0; m < 4; ++m) {
      const __m512i first = _mm512_permutex2var_epi16(a0, lo[m], a1);
      const __m512i second = _mm512_permutex2var_epi16(a2, hi[m], a3);
      _mm512_storeu_si512(out + 32 * m, _mm512_mask_blend_epi16(0xFFFF0000u, first, second));
    }
  }
  if (bytes % 64) {
    const __m512i a0 = _mm512_loadu_si512(x), a1 = _mm512_loadu_si512(x + 32);
    for (int m = 0; m < 4; ++m)
      _mm256_storeu_si256((__m256i*)(out + 16 * m),
                          _mm512_castsi512_si256(_mm512_permutex2var_epi16(a0, lo[m], a1)));
  }
}

// One row of one block: float32 sum of its groups' scaled sums.
inline float row(const Block& b, const int8_t* v, const float* s) {
  const __m512i table = levels_table();
  const uint16_t* x = b.x;
  __m512 acc = _mm512_setzero_ps();
  const int64_t n = b.bytes / 64;
  for (int64_t c = 0; c < n; ++c, v += 64, x += 128, s += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetch, _MM_HINT_T0);
    const __m512i w = _mm512_loadu_si512(v);
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(w, table),
                                  (__m512bh)_mm512_loadu_si512(x));
    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table),
                           (__m512bh)_mm512_loadu_si512(x + 32));
    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table),
                           (__m512bh)_mm512_loadu_si512(x + 64));
    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table),
                           (__m512bh)_mm512_loadu_si512(x + 96));
    const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]));
    acc = _mm512_fmadd_ps(sum, scale, acc);
  }
  if (b.bytes % 64) {  // one group: 16 words, 8 lanes (vpermw on 256 bits reads 4 index bits)
    const __m256i t = _mm512_castsi512_si256(table);
    const __m256i w = _mm256_loadu_si256((const __m256i*)v);
    __m256 sum = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)_mm256_permutexvar_epi16(w, t),
                                  (__m256bh)_mm256_loadu_si256((const __m256i*)x));
    sum = _mm256_dpbf16_ps(sum, (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(w, 4), t),
                           (__m256bh)_mm256_loadu_si256((const __m256i*)(x + 16)));
    sum = _mm256_dpbf16_ps(sum, (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(w, 8), t),
                           (__m256bh)_mm256_loadu_si256((const __m256i*)(x + 32)));
    sum = _mm256_dpbf16_ps(sum, (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(w, 12), t),
                           (__m256bh)_mm256_loadu_si256((const __m256i*)(x + 48)));
    acc = _mm512_fmadd_ps(_mm512_zextps256_ps512(sum), _mm512_set1_ps(s[0]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Rows [a, b) of one block into out (y for block 0, a partial sum for the others).
void row_range(const Product& p, const Block& blk, float* out, int64_t a, int64_t b) {
  for (int64_t o = a; o < b; ++o) out[o] = row(blk, blk.v + o * blk.bytes, p.s + o * p.groups + blk.g0);
}

// Each block's rows are cut in chunks of ~64 KB, the chunks (block by block) in one
// contiguous segment per thread (the caller and threads - 1 tasks of XLA's intra-op pool),
// so that each thread streams through memory in order. A thread takes chunks from the front
// of its own segment, then from the back of the others' (a task that starts late, or runs
// slower, loses its chunks to the others): every chunk is computed once and the caller
// returns when all are done, never waiting for a task that has not started. Blocks after
// the first write partial sums, added to y in block order at the end.
constexpr int64_t kChunkBytes = 65536;
constexpr int kMaxThreads = 64;

struct Split {
  Product p;
  std::unique_ptr<uint16_t[], decltype(&std::free)> x{nullptr, &std::free};
  std::vector<float> partial;  // float32[blocks - 1, rows]
  int64_t rows, chunk, per_block, threads;
  // per segment: (front << 32) | back, chunk indices; the segment is empty when front >= back
  std::atomic<uint64_t> segment[kMaxThreads];
  std::atomic<int64_t> done{0};
  int64_t total;

  bool take(int t, bool front, int64_t* c) {
    uint64_t cur = segment[t].load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = static_cast<int64_t>(cur >> 32), b = static_cast<int64_t>(cur & 0xffffffffu);
      if (f >= b) return false;
      const uint64_t next = front ? cur + (uint64_t{1} << 32) : cur - 1;
      if (segment[t].compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        *c = front ? f : b - 1;
        return true;
      }
    }
  }
  void run(int64_t c) {
    const int64_t k = c / per_block, a = (c % per_block) * chunk;
    float* out = k == 0 ? p.y : partial.data() + (k - 1) * rows;
    row_range(p, p.blocks[k], out, a, std::min(rows, a + chunk));
    done.fetch_add(1, std::memory_order_release);
  }
  void work(int t) {
    int64_t c;
    while (take(t, true, &c)) run(c);
    for (int64_t k = 1; k < threads; ++k) {
      const int u = static_cast<int>((t + k) % threads);
      while (take(u, false, &c)) run(c);
    }
  }
};

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> s,
                ffi::RemainingArgs blocks, ffi::ResultBuffer<ffi::F32> y) {
  const auto bad = [](const char* what) {
    return ffi::Error::InvalidArgument(std::string("pk_int4_row_product: ") + what);
  };
  if (s.dimensions().size() != 2 || blocks.size() == 0) return bad("bad operand ranks");
  const int64_t rows = s.dimensions()[0], groups = s.dimensions()[1];
  auto st = std::make_shared<Split>();
  int64_t total_bytes = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    auto v = blocks.get<ffi::Buffer<ffi::S8>>(k);
    if (!v.has_value()) return bad("blocks must be int8");
    if (v->dimensions().size() != 2) return bad("bad operand ranks");
    const int64_t bytes = v->dimensions()[1];
    if (v->dimensions()[0] != rows || bytes % 32 || bytes <= 0) return bad("inconsistent shapes");
    st->p.blocks.push_back(Block{v->typed_data(), bytes, total_bytes / 32, nullptr});
    total_bytes += bytes;
  }
  if (32 * groups != total_bytes || static_cast<int64_t>(x.element_count()) != 2 * total_bytes ||
      static_cast<int64_t>(y->element_count()) != rows)
    return bad("inconsistent shapes");
  // the inputs in the loop's order, 64-byte aligned
  st->x.reset(static_cast<uint16_t*>(std::aligned_alloc(64, (4 * total_bytes + 63) / 64 * 64)));
  if (!st->x) return ffi::Error::Internal("pk_int4_row_product: out of memory");
  for (Block& blk : st->p.blocks) {
    uint16_t* out = st->x.get() + 64 * blk.g0;
    rearrange(reinterpret_cast<const uint16_t*>(x.typed_data()) + 64 * blk.g0, blk.bytes, out);
    blk.x = out;
  }
  st->p.s = s.typed_data();
  st->p.groups = groups;
  st->p.y = y->typed_data();
  st->rows = rows;
  const int64_t widest = std::max_element(st->p.blocks.begin(), st->p.blocks.end(),
                                          [](const Block& a, const Block& b) {
                                            return a.bytes < b.bytes;
                                          })->bytes;
  st->chunk = std::max<int64_t>(1, kChunkBytes / widest);
  st->per_block = (rows + st->chunk - 1) / st->chunk;
  st->total = st->per_block * static_cast<int64_t>(st->p.blocks.size());
  st->partial.resize((st->p.blocks.size() - 1) * rows);
  if (st->total >= (int64_t{1} << 31)) return bad("too many rows");
  if (st->total == 0) return ffi::Error::Success();
  st->threads = std::max<int64_t>(1, std::min<int64_t>({pool.num_threads(), st->total,
                                                        kMaxThreads}));
  for (int64_t t = 0; t < st->threads; ++t) {
    const uint64_t f = t * st->total / st->threads, b = (t + 1) * st->total / st->threads;
    st->segment[t].store((f << 32) | b, std::memory_order_relaxed);
  }
  for (int64_t t = 1; t < st->threads; ++t) pool.Schedule([st, t] { st->work(static_cast<int>(t)); });
  st->work(0);
  while (st->done.load(std::memory_order_acquire) < st->total) _mm_pause();
  for (size_t k = 1; k < st->p.blocks.size(); ++k)
    for (int64_t o = 0; o < rows; ++o) st->p.y[o] += st->partial[(k - 1) * rows + o];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PkInt4RowProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
