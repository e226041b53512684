// CUDA implementations of the mask-compaction ops. Layouts are documented in
// ../mask_compaction.h; schemas, argument checks and the CPU implementations
// (which these must match bit for bit) live in ../mask_compaction.cpp.
//
// Every op only moves values, so the value kernels are templated on the raw
// element bits (uint8/16/32/64_t, picked by dispatch_by_element_size) rather
// than on the dtype. Index arithmetic that can exceed 2^31 is int64, and every
// grid-stride loop uses int64 counters so that no grid size has to cover the
// whole problem.
#include "../mask_compaction.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream. Deliberately not ATen/cuda/CUDAContext.h:
// that one also pulls in the cuSPARSE/cuBLAS/cuSOLVER headers, which a bare
// toolkit may not ship and which nothing here uses.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace lotus_kernels {

namespace {

constexpr int kThreads = 256;  // threads per block for every kernel here
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// Grid-stride loops make any grid size correct; this cap only keeps the grid
// well inside gridDim.x's range while still filling every SM many times over.
constexpr int64_t kMaxBlocks = 65536;

// Blocks for a grid-stride loop over `work` items, one thread per item.
// Callers never pass work == 0 (they return early instead of launching).
int blocks_for_items(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// Blocks for a loop that gives each of `rows` rows to one whole block.
int blocks_for_rows(int64_t rows) {
  return static_cast<int>(std::min<int64_t>(rows, kMaxBlocks));
}

// compress/decompress report a bad group by atomicMin of an encoded flat group
// index into one 64-bit word. The word starts at all ones (int64 -1 ==
// ULLONG_MAX), so "still all ones" means no error, and the minimum names the
// first bad group in row-major order, the one a serial CPU loop raises on.
constexpr unsigned long long kNoError = ~0ULL;

at::Tensor new_error_word(const at::Tensor& like) {
  return at::full({1}, -1, like.options().dtype(at::kLong));
}

unsigned long long* error_word_ptr(at::Tensor& word) {
  return reinterpret_cast<unsigned long long*>(word.data_ptr<int64_t>());
}

unsigned long long read_error_word(const at::Tensor& word) {
  // One host sync; the ops must raise before returning, so it is unavoidable.
  return static_cast<unsigned long long>(word.item<int64_t>());
}

// ---------------------------------------------------------------------------
// keep_indices (also the first pass of dense_to_bsr)
// ---------------------------------------------------------------------------

// One block per row (grid-stride over rows, so every thread of a block works
// on the same row and the __syncthreads below are uniform). The row is walked
// in chunks of kThreads columns; thread t of a chunk owns column start + t.
// A kept column's output position is
//   base (kept columns in earlier chunks)
//   + kept columns in earlier warps of this chunk (scan of per-warp totals)
//   + kept columns in lower lanes of this warp (ballot + popc),
// which is exactly its rank among the row's kept columns, so the output is in
// ascending column order like the CPU loop, without any sorting.
__global__ void __launch_bounds__(kThreads)
    keep_indices_kernel(const uint8_t* __restrict__ mask, int64_t rows, int64_t n,
                        int32_t* __restrict__ indices, int32_t* __restrict__ counts) {
  __shared__ int warp_kept[kWarpsPerBlock];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const unsigned lower_lanes = (1u << lane) - 1u;  // lane 0 -> 0, lane 31 -> 0x7fffffff

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint8_t* m = mask + row * n;
    int32_t* out = indices + row * n;
    int64_t base = 0;
    for (int64_t start = 0; start < n; start += kThreads) {
      const int64_t j = start + tid;
      const bool keep = j < n && m[j] != 0;
      // Every lane reaches the ballot (the loop bound is block-uniform), so
      // the full mask is correct even in the ragged last chunk.
      const unsigned ballot = __ballot_sync(0xffffffffu, keep);
      if (lane == 0) warp_kept[warp] = __popc(ballot);
      __syncthreads();
      // Exclusive scan of the per-warp totals. There are only kWarpsPerBlock
      // (8) of them, so each thread sums the ones it needs straight from
      // shared memory (broadcast reads) instead of a separate scan pass.
      int64_t warp_base = 0, chunk_kept = 0;
      for (int w = 0; w < kWarpsPerBlock; ++w) {
        const int k = warp_kept[w];
        if (w < warp) warp_base += k;
        chunk_kept += k;
      }
      if (keep) out[base + warp_base + __popc(ballot & lower_lanes)] = static_cast<int32_t>(j);
      base += chunk_kept;
      // warp_kept is overwritten by the next chunk: everyone must have read it.
      __syncthreads();
    }
    // base is now the row's count: pad the rest of the row with -1.
    for (int64_t j = base + tid; j < n; j += kThreads) out[j] = -1;
    if (tid == 0) counts[row] = static_cast<int32_t>(base);
  }
}

// Fills indices [rows, n] and counts [rows] (int32, same device) from a
// contiguous bool mask [rows, n]. n <= INT32_MAX is the caller's job. The
// mask is read as bytes, any nonzero byte meaning true (as on the CPU: a
// bool byte other than 0/1 is undefined behaviour to load as bool).
void launch_keep_indices(const at::Tensor& mask, at::Tensor& indices, at::Tensor& counts) {
  const int64_t rows = mask.size(0), n = mask.size(1);
  if (rows == 0) return;  // nothing to write; n == 0 still launches to write counts = 0
  keep_indices_kernel<<<blocks_for_rows(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint8_t*>(mask.data_ptr()), rows, n, indices.data_ptr<int32_t>(),
      counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// dense_to_bsr
// ---------------------------------------------------------------------------

// One block per block row: copy its counts[r] compacted column indices to
// col[crow[r]..] (widening to int64) and record the block row of each stored
// block, which the value copy needs to find its source rows.
__global__ void __launch_bounds__(kThreads)
    bsr_scatter_cols_kernel(const int32_t* __restrict__ kept_cols,  // [br, bc], -1 padded
                            const int32_t* __restrict__ counts,     // [br]
                            const int64_t* __restrict__ crow,       // [br + 1]
                            int64_t br, int64_t bc, int64_t* __restrict__ col,
                            int64_t* __restrict__ row_of) {
  for (int64_t r = blockIdx.x; r < br; r += gridDim.x) {
    const int64_t begin = crow[r];
    const int64_t count = counts[r];
    for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
      col[begin + k] = kept_cols[r * bc + k];
      row_of[begin + k] = r;
    }
  }
}

// One thread per output element (grid-stride): element e of values[nnz, bh,
// bw] is (block b, row i, column j) and comes from weight row
// row_of[b] * bh + i, column col[b] * bw + j. Writes are fully coalesced;
// reads are coalesced along each block row of bw elements.
template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    bsr_gather_values_kernel(const Bits* __restrict__ weight, int64_t cols,
                             const int64_t* __restrict__ row_of, const int64_t* __restrict__ col,
                             int64_t nnz, int64_t bh, int64_t bw, Bits* __restrict__ values) {
  const int64_t block_elems = bh * bw;
  const int64_t total = nnz * block_elems;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / block_elems;
    const int64_t within = e - b * block_elems;
    const int64_t i = within / bw;
    const int64_t j = within - i * bw;
    values[e] = weight[(row_of[b] * bh + i) * cols + col[b] * bw + j];
  }
}

// ---------------------------------------------------------------------------
// bsr_transpose
// ---------------------------------------------------------------------------

// One block per block row: row_of[b] = r for every b in [crow[r], crow[r+1]).
__global__ void __launch_bounds__(kThreads)
    bsr_row_of_kernel(const int64_t* __restrict__ crow, int64_t br, int64_t* __restrict__ row_of) {
  for (int64_t r = blockIdx.x; r < br; r += gridDim.x) {
    const int64_t end = crow[r + 1];
    for (int64_t b = crow[r] + threadIdx.x; b < end; b += blockDim.x) row_of[b] = r;
  }
}

// One thread per output element (grid-stride): element e of dst[nnz, bw, bh]
// is (position pos, row j, column i) and equals src[source[pos], i, j].
// Indexing by the destination keeps the writes coalesced.
template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    bsr_transpose_values_kernel(const Bits* __restrict__ src, const int64_t* __restrict__ source,
                                int64_t nnz, int64_t bh, int64_t bw, Bits* __restrict__ dst) {
  const int64_t block_elems = bh * bw;
  const int64_t total = nnz * block_elems;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pos = e / block_elems;
    const int64_t within = e - pos * block_elems;
    const int64_t j = within / bh;
    const int64_t i = within - j * bh;
    dst[e] = src[source[pos] * block_elems + i * bw + j];
  }
}

// ---------------------------------------------------------------------------
// compress_2to4 / decompress_2to4
// ---------------------------------------------------------------------------

// One thread per (row, metadata word), grid-stride. The thread owns the (up
// to) 8 groups whose codes share that word, so it can build the word in a
// register and store it once, with no atomics between threads. The last word
// of a row covers fewer groups when groups % 8 != 0; its unused codes stay 0.
//
// Slot selection, equal to the CPU's: the kept set is the mask's true entries
// (or the nonzero weights without a mask); more than two is an error; fewer
// are padded by adding the lowest free slot until there are two. The two
// slots are taken ascending; a padded slot stores +0, a kept one its bits.
//
// An offending group is recorded as ((row * groups + g) << 1) | (kept == 4)
// with atomicMin: the smallest flat index wins and the low bit lets the host
// report the count (3 or 4) in the CPU's message without another read.
template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    compress_2to4_kernel(const Bits* __restrict__ weight, const uint8_t* __restrict__ mask,
                         int64_t rows, int64_t cols, int64_t words, Bits* __restrict__ values,
                         uint32_t* __restrict__ metadata, unsigned long long* first_error) {
  const int64_t groups = cols / 4;
  const int64_t total = rows * words;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / words;
    const int64_t g_begin = (t - r * words) * kGroupsPerMetaWord;
    const int64_t g_end =
        g_begin + kGroupsPerMetaWord < groups ? g_begin + kGroupsPerMetaWord : groups;
    // Bit work in uint32_t: the code of group 7 may set the word's top bit.
    uint32_t word = 0;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t base = r * cols + 4 * g;
      Bits w[4];
      unsigned kept = 0;  // bit s set <=> slot s is kept
      for (int s = 0; s < 4; ++s) {
        w[s] = weight[base + s];
        const bool keep = mask != nullptr ? mask[base + s] != 0 : !bits_are_zero(w[s]);
        kept |= static_cast<unsigned>(keep) << s;
      }
      const int n_kept = __popc(kept);
      if (n_kept > 2) {
        const unsigned long long flat = static_cast<unsigned long long>(r * groups + g);
        atomicMin(first_error, (flat << 1) | static_cast<unsigned long long>(n_kept == 4));
        continue;  // the op raises; what this group would store is irrelevant
      }
      unsigned slots = kept;
      // ~slots & (slots + 1) isolates the lowest clear bit: the lowest free
      // slot. At most two iterations (n_kept == 0).
      while (__popc(slots) < 2) slots |= ~slots & (slots + 1u);
      const int i0 = __ffs(static_cast<int>(slots)) - 1;  // lowest set bit
      const int i1 = 31 - __clz(static_cast<int>(slots));  // highest set bit
      const int64_t out = r * (cols / 2) + 2 * g;
      values[out] = ((kept >> i0) & 1u) ? w[i0] : Bits(0);
      values[out + 1] = ((kept >> i1) & 1u) ? w[i1] : Bits(0);
      const uint32_t code = static_cast<uint32_t>(i0) | (static_cast<uint32_t>(i1) << 2);
      word |= code << (4 * (g - g_begin));  // g - g_begin == g % 8
    }
    metadata[t] = word;  // t == r * words + g_begin / 8
  }
}

// One thread per group, grid-stride. The output starts as zeros, so a thread
// only writes its two coded slots. A code with i0 >= i1 is corrupt (it would
// overwrite a value or scatter to the wrong slots); it is recorded as
// (flat group << 4) | code with atomicMin, so the host can name the first bad
// group and its slots exactly as the CPU message does.
template <typename Bits>
__global__ void __launch_bounds__(kThreads)
    decompress_2to4_kernel(const Bits* __restrict__ values, const uint32_t* __restrict__ metadata,
                           int64_t rows, int64_t cols, int64_t words, Bits* __restrict__ weight,
                           unsigned long long* first_error) {
  const int64_t groups = cols / 4;
  const int64_t total = rows * groups;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / groups;
    const int64_t g = t - r * groups;
    const uint32_t word = metadata[r * words + g / kGroupsPerMetaWord];
    const uint32_t code = (word >> (4 * (g % kGroupsPerMetaWord))) & 0xFu;
    const uint32_t i0 = code & 3u, i1 = code >> 2;
    if (i0 >= i1) {
      atomicMin(first_error, (static_cast<unsigned long long>(t) << 4) | code);
      continue;
    }
    // values[r, 2g] and values[r, 2g + 1] sit at flat 2 * t.
    weight[r * cols + 4 * g + i0] = values[2 * t];
    weight[r * cols + 4 * g + i1] = values[2 * t + 1];
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> keep_indices_cuda(const at::Tensor& keep_mask_in) {
  check_keep_indices_args(keep_mask_in);
  c10::cuda::CUDAGuard device_guard(keep_mask_in.device());
  const auto keep_mask = keep_mask_in.contiguous();
  const int64_t rows = keep_mask.size(0), n = keep_mask.size(1);
  auto indices = at::empty({rows, n}, keep_mask.options().dtype(at::kInt));
  auto counts = at::empty({rows}, keep_mask.options().dtype(at::kInt));
  launch_keep_indices(keep_mask, indices, counts);
  return {indices, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_to_bsr_cuda(const at::Tensor& weight_in,
                                                                 const at::Tensor& block_mask_in,
                                                                 int64_t bh, int64_t bw) {
  check_dense_to_bsr_args(weight_in, block_mask_in, bh, bw);
  c10::cuda::CUDAGuard device_guard(weight_in.device());
  const auto weight = weight_in.contiguous();
  const auto block_mask = block_mask_in.contiguous();
  const int64_t cols = weight.size(1);
  const int64_t br = block_mask.size(0), bc = block_mask.size(1);
  // The compaction pass below produces int32 column indices (keep_indices'
  // layout). The CPU version has no such limit, but reaching it needs a
  // weight row of more than 2^31 blocks.
  TORCH_CHECK_VALUE(bc <= INT32_MAX, "dense_to_bsr: ", bc,
                    " block columns do not fit the int32 compaction pass of the CUDA version");
  const auto long_opts = weight.options().dtype(at::kLong);

  // Pass 1: per block row, the kept block columns in ascending order (padded
  // with -1) and their count; the row pointer is the running sum of counts.
  auto kept_cols = at::empty({br, bc}, block_mask.options().dtype(at::kInt));
  auto counts = at::empty({br}, block_mask.options().dtype(at::kInt));
  launch_keep_indices(block_mask, kept_cols, counts);
  auto crow = allocate_row_pointer(br + 1, long_opts, "dense_to_bsr", "weight's block rows");
  if (br > 0) crow.slice(0, 1).copy_(at::cumsum(counts, 0, at::kLong));
  // nnz sizes the outputs, so it must reach the host (a conversion op, not a
  // per-step one: one sync is fine).
  const int64_t nnz = crow.select(0, br).item<int64_t>();

  auto col = at::empty({nnz}, long_opts);
  auto values = at::empty({nnz, bh, bw}, weight.options());
  if (nnz == 0) return {crow, col, values};

  // Pass 2: col_indices (int64) and the block row of every stored block.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto row_of = at::empty({nnz}, long_opts);
  bsr_scatter_cols_kernel<<<blocks_for_rows(br), kThreads, 0, stream>>>(
      kept_cols.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), crow.data_ptr<int64_t>(), br, bc,
      col.data_ptr<int64_t>(), row_of.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 3: the block values, copied verbatim as raw bits.
  dispatch_by_element_size(weight.element_size(), "dense_to_bsr", [&](auto tag) {
    using Bits = decltype(tag);
    bsr_gather_values_kernel<Bits><<<blocks_for_items(nnz * bh * bw), kThreads, 0, stream>>>(
        static_cast<const Bits*>(weight.data_ptr()), cols, row_of.data_ptr<int64_t>(),
        col.data_ptr<int64_t>(), nnz, bh, bw, static_cast<Bits*>(values.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {crow, col, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_transpose_cuda(const at::Tensor& crow_in,
                                                                  const at::Tensor& col_in,
                                                                  const at::Tensor& values_in,
                                                                  int64_t rows, int64_t cols) {
  check_bsr_args(crow_in, col_in, values_in, rows, cols);
  c10::cuda::CUDAGuard device_guard(values_in.device());
  const auto crow = crow_in.contiguous();
  const auto col = col_in.contiguous();
  const auto values = values_in.contiguous();
  const int64_t nnz = values.size(0), bh = values.size(1), bw = values.size(2);
  const int64_t br = rows / bh, bc = cols / bw;

  auto values_t = at::empty({nnz, bw, bh}, values.options());
  // Allocated first whatever nnz: a `cols` too large for W^T's row pointer is
  // a named error here rather than an allocator message from searchsorted.
  auto empty_crow_t = allocate_row_pointer(bc + 1, crow.options(), "bsr_transpose", "cols");
  if (nnz == 0) return {empty_crow_t, at::empty({0}, col.options()), values_t};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Block row of every stored block (check_bsr_args guarantees crow is a
  // valid row pointer, so the ranges tile [0, nnz) exactly).
  auto row_of = at::empty({nnz}, col.options());
  bsr_row_of_kernel<<<blocks_for_rows(br), kThreads, 0, stream>>>(crow.data_ptr<int64_t>(), br,
                                                                   row_of.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Blocks are stored row-major, so a *stable* sort by column lists each
  // column's blocks by ascending original block row: the column-sorted order
  // of the transpose, the same order as the CPU counting sort. `perm` maps a
  // transposed position to its source block.
  at::Tensor sorted_cols, perm;
  std::tie(sorted_cols, perm) =
      at::sort(col, /*stable=*/c10::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  auto col_t = row_of.index_select(0, perm);
  // A column listed twice in one block row: after the stable sort its two
  // blocks are neighbours with equal (column, row). One more sync, before the
  // values kernel (a conversion op; the CPU version checks in its serial pass).
  if (nnz > 1) {
    const auto dup = sorted_cols.slice(0, 1).eq(sorted_cols.slice(0, 0, nnz - 1))
                         .logical_and_(col_t.slice(0, 1).eq(col_t.slice(0, 0, nnz - 1)));
    const auto where = dup.nonzero();
    if (where.size(0) > 0) {
      const int64_t i = where[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "bsr_transpose: col_indices lists block column ",
                        sorted_cols[i].item<int64_t>(), " twice in block row ",
                        col_t[i].item<int64_t>(), "; a BSR row holds each column at most once");
    }
  }
  // crow_t[c] = number of blocks with column < c = left insertion point of c.
  auto crow_t = at::searchsorted(sorted_cols, at::arange(bc + 1, col.options()),
                                 /*out_int32=*/false, /*right=*/false);

  dispatch_by_element_size(values.element_size(), "bsr_transpose", [&](auto tag) {
    using Bits = decltype(tag);
    bsr_transpose_values_kernel<Bits><<<blocks_for_items(nnz * bh * bw), kThreads, 0, stream>>>(
        static_cast<const Bits*>(values.data_ptr()), perm.data_ptr<int64_t>(), nnz, bh, bw,
        static_cast<Bits*>(values_t.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {crow_t, col_t, values_t};
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cuda(const at::Tensor& weight_in,
                                                      const c10::optional<at::Tensor>& mask_in) {
  check_compress_2to4_args(weight_in, mask_in);
  c10::cuda::CUDAGuard device_guard(weight_in.device());
  const auto weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t rows = weight.size(0), cols = weight.size(1), groups = cols / 4;
  const int64_t words = meta_words_per_row(cols);
  auto values = at::empty({rows, cols / 2}, weight.options());
  // Every word gets exactly one writer in the kernel, so no zero fill needed.
  auto metadata = at::empty({rows, words}, weight.options().dtype(at::kInt));
  if (rows * words == 0) return {values, metadata};  // no groups: nothing to write

  auto error = new_error_word(weight);
  dispatch_by_element_size(weight.element_size(), "compress_2to4", [&](auto tag) {
    using Bits = decltype(tag);
    compress_2to4_kernel<Bits>
        <<<blocks_for_items(rows * words), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            static_cast<const Bits*>(weight.data_ptr()),
            mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr, rows, cols,
            words,
            static_cast<Bits*>(values.data_ptr()),
            // The int32 words hold uint32 bit patterns (the CPU does the same cast).
            reinterpret_cast<uint32_t*>(metadata.data_ptr<int32_t>()), error_word_ptr(error));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const unsigned long long first_error = read_error_word(error);
  if (first_error != kNoError) {
    const int64_t flat = static_cast<int64_t>(first_error >> 1);
    const int64_t r = flat / groups, g = flat % groups;
    const int n_kept = (first_error & 1ULL) ? 4 : 3;
    TORCH_CHECK_VALUE(false, "compress_2to4: row ", r, ", columns ", 4 * g, "..", 4 * g + 3,
                      " keep ", n_kept, " ", mask.defined() ? "entries in mask" : "nonzero weights",
                      "; 2:4 allows at most 2 in every group of 4 along in_features");
  }
  return {values, metadata};
}

at::Tensor decompress_2to4_cuda(const at::Tensor& values_in, const at::Tensor& metadata_in) {
  check_decompress_2to4_args(values_in, metadata_in);
  c10::cuda::CUDAGuard device_guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2, groups = cols / 4;
  const int64_t words = metadata.size(1);
  auto weight = at::zeros({rows, cols}, values.options());
  if (rows * groups == 0) return weight;

  auto error = new_error_word(values);
  dispatch_by_element_size(values.element_size(), "decompress_2to4", [&](auto tag) {
    using Bits = decltype(tag);
    decompress_2to4_kernel<Bits>
        <<<blocks_for_items(rows * groups), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            static_cast<const Bits*>(values.data_ptr()),
            reinterpret_cast<const uint32_t*>(metadata.data_ptr<int32_t>()), rows, cols, words,
            static_cast<Bits*>(weight.data_ptr()), error_word_ptr(error));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const unsigned long long first_error = read_error_word(error);
  if (first_error != kNoError) {
    const int64_t flat = static_cast<int64_t>(first_error >> 4);
    const int64_t r = flat / groups, g = flat % groups;
    const int code = static_cast<int>(first_error & 0xFULL);
    const int i0 = code & 3, i1 = code >> 2;
    TORCH_CHECK_VALUE(false, "decompress_2to4: metadata row ", r, " group ", g, " codes slots (",
                      i0, ", ", i1, "); a valid code holds two ascending slots");
  }
  return weight;
}

TORCH_LIBRARY_IMPL(lotus_kernels, CUDA, m) {
  m.impl("keep_indices", &keep_indices_cuda);
  m.impl("dense_to_bsr", &dense_to_bsr_cuda);
  m.impl("bsr_transpose", &bsr_transpose_cuda);
  m.impl("compress_2to4", &compress_2to4_cuda);
  m.impl("decompress_2to4", &decompress_2to4_cuda);
}

}  // namespace lotus_kernels
