// Mask compaction: turning keep-masks into the compact index structures the
// sparse kernels read. One schema per op (TORCH_LIBRARY in
// mask_compaction.cpp), a CPU implementation there and a CUDA implementation
// in cuda/mask_compaction.cu. Python references live in
// lotus_kernels/mask_compaction.py; the tests compare all three exactly.
//
// Layouts (shared by every implementation):
//
// Bool masks are read byte by byte, any nonzero byte meaning true: a uint8
// tensor viewed as bool (bytes 2, 255, ...) keeps what its nonzero bytes say.
//
// A valid BSR structure (checked by bsr_transpose, never assumed): crow
// starts at 0, never decreases and ends at nnz; every column lies in
// [0, C/bw); no block row lists a column twice (the order within a row is
// free).
//
// keep_indices(keep_mask[B, N] bool) -> (indices[B, N] int32, counts[B] int32)
//   indices[b, :counts[b]] are the positions of the true entries of row b in
//   ascending order; indices[b, counts[b]:] are -1. The shape is static so
//   the op traces under torch.compile without a data-dependent size.
//
// dense_to_bsr(weight[R, C], block_mask[R/bh, C/bw] bool, bh, bw)
//   -> (crow_indices[R/bh + 1] int64, col_indices[nnz] int64,
//       values[nnz, bh, bw] weight.dtype)
//   The BSR triple of `weight` keeping exactly the blocks set in block_mask,
//   column-sorted within each block row. Values are copied verbatim, so the
//   caller passes the already-masked weight. When every kept block holds a
//   nonzero this equals weight.to_sparse_bsr((bh, bw)).
//
// bsr_transpose(crow, col, values[nnz, bh, bw], rows=R, cols=C)
//   -> the BSR triple of the [C, R] transpose: blocks [bw, bh], each block
//   transposed, column-sorted (i.e. sorted by the original block row).
//
// compress_2to4(weight[R, C] (C % 4 == 0), mask[R, C] bool or None)
//   -> (values[R, C/2] weight.dtype, metadata[R, ceil(C/32)] int32)
//   Along each row, group g covers columns 4g..4g+3 and keeps two slots
//   i0 < i1 (0..3). values[r, 2g] = w[r, 4g+i0], values[r, 2g+1] = w[r, 4g+i1].
//   Group g's 4-bit code sits at bits 4*(g%8) .. 4*(g%8)+3 of
//   metadata[r, g/8]: low 2 bits i0, high 2 bits i1. Unused codes are 0.
//   Kept slots: the mask's true entries, or (no mask) the nonzero entries;
//   more than two is an error, fewer are padded with the lowest free slots,
//   whose stored value is +0.
//
// decompress_2to4(values[R, C/2], metadata[R, ceil(C/32)]) -> weight[R, C]
//   The exact inverse: zeros except at the coded slots.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace lotus_kernels {

// 2:4 metadata packing: 8 groups of 4 columns per int32 word.
constexpr int64_t kGroupsPerMetaWord = 8;

inline int64_t meta_words_per_row(int64_t cols) {
  const int64_t groups = cols / 4;
  return (groups + kGroupsPerMetaWord - 1) / kGroupsPerMetaWord;
}

// The compaction ops only move values, never compute with them, so they work
// on the raw bits: one instantiation per element size instead of one per
// dtype (fp16, bf16, fp32, fp64 and the fp8 formats all share code, and the
// CUDA build stays small).
template <typename F>
void dispatch_by_element_size(int64_t element_size, const char* op, F&& f) {
  switch (element_size) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported element size ", element_size);
  }
}

// +0 and -0 are both zero. Valid for every IEEE-style floating format torch
// has (sign in the top bit), which is why the ops accept floating dtypes only.
template <typename Bits>
C10_HOST_DEVICE inline bool bits_are_zero(Bits v) {
  constexpr Bits kSign = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  return (v & Bits(~kSign)) == 0;
}

// Argument checks shared by the CPU and CUDA implementations. They raise
// c10::ValueError / c10::TypeError (Python ValueError / TypeError), and they
// run to completion before anything is allocated from the arguments or any
// parallel region starts: nothing is ever thrown from inside a parallel
// region (at::parallel_for) or a kernel.
void check_keep_indices_args(const at::Tensor& keep_mask);
void check_dense_to_bsr_args(const at::Tensor& weight, const at::Tensor& block_mask,
                             int64_t block_rows, int64_t block_cols);
// Checks shapes, dtypes and (with one host sync) that the triple is a valid
// BSR structure: crow starts at 0, never decreases, ends at nnz, and every
// column lies in range.
void check_bsr_args(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                    int64_t rows, int64_t cols);
void check_compress_2to4_args(const at::Tensor& weight, const c10::optional<at::Tensor>& mask);
void check_decompress_2to4_args(const at::Tensor& values, const at::Tensor& metadata);
// at::zeros({length}) of int64 row pointers whose length comes from a scalar
// argument (rows, cols): an allocation failure becomes a ValueError naming
// `what`, the argument that asked for it, instead of an allocator message.
at::Tensor allocate_row_pointer(int64_t length, const at::TensorOptions& options, const char* op,
                                const char* what);

// CPU implementations (mask_compaction.cpp).
std::tuple<at::Tensor, at::Tensor> keep_indices_cpu(const at::Tensor& keep_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_to_bsr_cpu(
    const at::Tensor& weight, const at::Tensor& block_mask, int64_t block_rows, int64_t block_cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_transpose_cpu(
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values, int64_t rows,
    int64_t cols);
std::tuple<at::Tensor, at::Tensor> compress_2to4_cpu(const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& mask);
at::Tensor decompress_2to4_cpu(const at::Tensor& values, const at::Tensor& metadata);

}  // namespace lotus_kernels
