// CPU implementations of the mask-compaction ops and their TORCH_LIBRARY
// schemas. Layouts are documented in mask_compaction.h.
#include "mask_compaction.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace lotus_kernels {

// ---------------------------------------------------------------------------
// Argument checks (shared with CUDA)
// ---------------------------------------------------------------------------

namespace {

// The zero test works on raw bits (bits_are_zero), which is only right for
// formats with a sign bit on top and a +-0 encoding; fp8/fp4 variants differ
// (e8m0 has no zero, fnuz formats use 0x80 for NaN), so they are refused.
void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
                   op, ": ", name, " must be float16, bfloat16, float32 or float64, got dtype ",
                   dt);
}

void check_bool(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, op, ": ", name,
                   " must be a bool tensor, got dtype ", t.scalar_type());
}

// Largest length of an int64 index tensor whose byte size still fits int64:
// sizes derived from arguments (R/bh + 1, C/bw + 1) are checked against it
// before anything is allocated, so that no size computation can overflow.
constexpr int64_t kMaxIndexLength = INT64_MAX / static_cast<int64_t>(sizeof(int64_t));

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ",
                    name_b, " is on ", b.device(), "; both must be on the same device");
}

}  // namespace

void check_keep_indices_args(const at::Tensor& keep_mask) {
  check_bool(keep_mask, "keep_indices", "keep_mask");
  TORCH_CHECK_VALUE(keep_mask.dim() == 2, "keep_indices: keep_mask must be 2-D [B, N], got shape ",
                    keep_mask.sizes());
  // int32 indices and counts.
  TORCH_CHECK_VALUE(keep_mask.size(1) <= INT32_MAX, "keep_indices: N=", keep_mask.size(1),
                    " does not fit int32 indices");
}

void check_dense_to_bsr_args(const at::Tensor& weight, const at::Tensor& block_mask,
                             int64_t block_rows, int64_t block_cols) {
  check_floating(weight, "dense_to_bsr", "weight");
  check_bool(block_mask, "dense_to_bsr", "block_mask");
  check_same_device(weight, block_mask, "dense_to_bsr", "weight", "block_mask");
  TORCH_CHECK_VALUE(weight.dim() == 2, "dense_to_bsr: weight must be 2-D [R, C], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(block_rows > 0 && block_cols > 0,
                    "dense_to_bsr: block size must be positive, got (", block_rows, ", ",
                    block_cols, ")");
  TORCH_CHECK_VALUE(weight.size(0) % block_rows == 0 && weight.size(1) % block_cols == 0,
                    "dense_to_bsr: weight shape ", weight.sizes(),
                    " is not divisible by the block size (", block_rows, ", ", block_cols, ")");
  const int64_t br = weight.size(0) / block_rows, bc = weight.size(1) / block_cols;
  TORCH_CHECK_VALUE(block_mask.dim() == 2 && block_mask.size(0) == br && block_mask.size(1) == bc,
                    "dense_to_bsr: block_mask must have shape [", br, ", ", bc,
                    "] (weight shape / block size), got ", block_mask.sizes());
  // crow_indices has br + 1 entries (an empty weight [huge, 0] is a valid tensor).
  TORCH_CHECK_VALUE(br < kMaxIndexLength, "dense_to_bsr: weight has ", br,
                    " block rows; its row pointer of br + 1 int64 entries cannot be addressed");
}

void check_bsr_args(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                    int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong,
                   "bsr_transpose: crow_indices and col_indices must be int64, got ",
                   crow.scalar_type(), " and ", col.scalar_type());
  check_floating(values, "bsr_transpose", "values");
  check_same_device(crow, values, "bsr_transpose", "crow_indices", "values");
  check_same_device(col, values, "bsr_transpose", "col_indices", "values");
  TORCH_CHECK_VALUE(values.dim() == 3, "bsr_transpose: values must be 3-D [nnz, bh, bw], got shape ",
                    values.sizes());
  const int64_t nnz = values.size(0), bh = values.size(1), bw = values.size(2);
  TORCH_CHECK_VALUE(bh > 0 && bw > 0, "bsr_transpose: values must hold blocks of positive size, got [",
                    nnz, ", ", bh, ", ", bw, "]");
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "bsr_transpose: rows and cols must be non-negative, got (",
                    rows, ", ", cols, ")");
  TORCH_CHECK_VALUE(rows % bh == 0 && cols % bw == 0, "bsr_transpose: shape (", rows, ", ", cols,
                    ") is not divisible by the block size (", bh, ", ", bw, ")");
  const int64_t br = rows / bh, bc = cols / bw;
  // Both row pointers (br + 1 and bc + 1 entries) must be addressable before
  // any size is computed from them (br + 1 overflowed for rows = 2^63 - 1).
  TORCH_CHECK_VALUE(br < kMaxIndexLength && bc < kMaxIndexLength, "bsr_transpose: shape (", rows,
                    ", ", cols, ") with block size (", bh, ", ", bw, ") gives (", br, ", ", bc,
                    ") block rows and columns; at most ", kMaxIndexLength - 1,
                    " each fit an int64 row pointer");
  // Compared as size - 1 == br: nothing here can overflow.
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.size(0) - 1 == br, "bsr_transpose: crow_indices must be [",
                    br + 1, "] for ", rows, " rows and block height ", bh, ", got shape ",
                    crow.sizes());
  TORCH_CHECK_VALUE(col.dim() == 1 && col.size(0) == nnz, "bsr_transpose: col_indices must be [",
                    nnz, "] (values.shape[0]), got shape ", col.sizes());
  // Structure checks with a single host sync (this is a conversion op, not a
  // per-step one): a malformed triple must raise, never produce garbage.
  // Duplicate columns within a block row need the row of every block, so the
  // implementations check them in their serial index pass (after this check
  // made the row pointer trustworthy, before any parallel work).
  const auto yes = at::ones({}, crow.options().dtype(at::kBool));
  auto ok = at::stack({
      crow.select(0, 0).eq(0),
      crow.select(0, br).eq(nnz),
      crow.slice(0, 1).ge(crow.slice(0, 0, br)).all(),
      nnz > 0 ? at::logical_and(col.min().ge(0), col.max().lt(bc)) : yes,
  });
  auto flags = ok.cpu();
  auto f = flags.accessor<bool, 1>();
  TORCH_CHECK_VALUE(f[0] && f[1] && f[2],
                    "bsr_transpose: crow_indices is not a valid BSR row pointer (must start at 0, "
                    "never decrease and end at nnz=",
                    nnz, ")");
  TORCH_CHECK_VALUE(f[3], "bsr_transpose: col_indices must lie in [0, ", bc, ")");
}

at::Tensor allocate_row_pointer(int64_t length, const at::TensorOptions& options, const char* op,
                                const char* what) {
  std::string failure;
  try {
    return at::zeros({length}, options);
  } catch (const c10::Error& e) {
    failure = e.what_without_backtrace();
  }
  // Only the size can make the allocation fail: name the argument that asked for it.
  TORCH_CHECK_VALUE(false, op, ": ", what, " needs a row pointer of ", length,
                    " int64 entries, which cannot be allocated (", failure, ")");
  return at::Tensor();  // not reached
}

void check_compress_2to4_args(const at::Tensor& weight, const c10::optional<at::Tensor>& mask) {
  check_floating(weight, "compress_2to4", "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "compress_2to4: weight must be 2-D [R, C], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) % 4 == 0,
                    "compress_2to4: in_features (weight.shape[1]) must be divisible by 4, got ",
                    weight.size(1));
  if (mask.has_value()) {
    check_bool(*mask, "compress_2to4", "mask");
    check_same_device(weight, *mask, "compress_2to4", "weight", "mask");
    TORCH_CHECK_VALUE(mask->sizes() == weight.sizes(), "compress_2to4: mask shape ", mask->sizes(),
                      " must equal weight shape ", weight.sizes());
  }
}

void check_decompress_2to4_args(const at::Tensor& values, const at::Tensor& metadata) {
  check_floating(values, "decompress_2to4", "values");
  TORCH_CHECK_TYPE(metadata.scalar_type() == at::kInt,
                   "decompress_2to4: metadata must be int32, got ", metadata.scalar_type());
  check_same_device(values, metadata, "decompress_2to4", "values", "metadata");
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) % 2 == 0,
                    "decompress_2to4: values must be 2-D [R, C/2] with C divisible by 4, got shape ",
                    values.sizes());
  const int64_t cols = values.size(1) * 2;
  TORCH_CHECK_VALUE(metadata.dim() == 2 && metadata.size(0) == values.size(0) &&
                        metadata.size(1) == meta_words_per_row(cols),
                    "decompress_2to4: metadata must have shape [", values.size(0), ", ",
                    meta_words_per_row(cols), "] for values of shape ", values.sizes(), ", got ",
                    metadata.sizes());
}

// ---------------------------------------------------------------------------
// CPU implementations
// ---------------------------------------------------------------------------

namespace {

// Rows are independent in every op; a grain of a few rows keeps tiny inputs
// single-threaded while large ones spread over all cores.
int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// A bool tensor's storage read as bytes, any nonzero byte meaning true. A
// bool whose byte is not 0 or 1 (a uint8 tensor viewed as bool, a mask from
// foreign memory) is undefined behaviour to load as bool: the compiler may
// test one bit in one loop and the whole byte in the next, so dense_to_bsr
// counted blocks one way and wrote them another (uninitialised or
// out-of-range col_indices). Every mask is read through this.
const uint8_t* mask_bytes(const at::Tensor& contiguous_mask) {
  return static_cast<const uint8_t*>(contiguous_mask.data_ptr());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> keep_indices_cpu(const at::Tensor& keep_mask_in) {
  check_keep_indices_args(keep_mask_in);
  const auto keep_mask = keep_mask_in.contiguous();
  const int64_t rows = keep_mask.size(0), n = keep_mask.size(1);
  auto indices = at::empty({rows, n}, keep_mask.options().dtype(at::kInt));
  auto counts = at::empty({rows}, keep_mask.options().dtype(at::kInt));
  // Bytes, not bool: see mask_bytes.
  const uint8_t* mask = mask_bytes(keep_mask);
  int32_t* idx = indices.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* m = mask + r * n;
      int32_t* out = idx + r * n;
      int32_t k = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (m[j] != 0) out[k++] = static_cast<int32_t>(j);
      }
      cnt[r] = k;
      std::fill(out + k, out + n, -1);
    }
  });
  return {indices, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_to_bsr_cpu(const at::Tensor& weight_in,
                                                                const at::Tensor& block_mask_in,
                                                                int64_t bh, int64_t bw) {
  check_dense_to_bsr_args(weight_in, block_mask_in, bh, bw);
  const auto weight = weight_in.contiguous();
  const auto block_mask = block_mask_in.contiguous();
  const int64_t cols = weight.size(1);
  const int64_t br = block_mask.size(0), bc = block_mask.size(1);
  const uint8_t* bm = mask_bytes(block_mask);

  // Pass 1: kept blocks per block row into crow[r + 1] (parallel); then the
  // running sum makes it the row pointer. Allocated first, through the named
  // check: an empty weight [2^40, 0] has a row pointer no memory holds.
  auto crow = allocate_row_pointer(br + 1, weight.options().dtype(at::kLong), "dense_to_bsr",
                                   "weight's block rows");
  int64_t* crow_p = crow.data_ptr<int64_t>();
  at::parallel_for(0, br, row_grain(bc), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t k = 0;
      for (int64_t c = 0; c < bc; ++c) k += bm[r * bc + c] != 0;
      crow_p[r + 1] = k;
    }
  });
  for (int64_t r = 0; r < br; ++r) crow_p[r + 1] += crow_p[r];
  const int64_t nnz = crow_p[br];

  // Pass 2: column indices and block values, each block row independently.
  auto col = at::empty({nnz}, weight.options().dtype(at::kLong));
  auto values = at::empty({nnz, bh, bw}, weight.options());
  int64_t* col_p = col.data_ptr<int64_t>();
  const int64_t es = weight.element_size();
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* v = static_cast<char*>(values.data_ptr());
  at::parallel_for(0, br, row_grain(bc * bh), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t b = crow_p[r];
      for (int64_t c = 0; c < bc; ++c) {
        if (bm[r * bc + c] == 0) continue;
        col_p[b] = c;
        for (int64_t i = 0; i < bh; ++i) {
          std::memcpy(v + ((b * bh + i) * bw) * es, w + ((r * bh + i) * cols + c * bw) * es,
                      bw * es);
        }
        ++b;
      }
    }
  });
  return {crow, col, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_transpose_cpu(const at::Tensor& crow_in,
                                                                 const at::Tensor& col_in,
                                                                 const at::Tensor& values_in,
                                                                 int64_t rows, int64_t cols) {
  check_bsr_args(crow_in, col_in, values_in, rows, cols);
  const auto crow = crow_in.contiguous();
  const auto col = col_in.contiguous();
  const auto values = values_in.contiguous();
  const int64_t nnz = values.size(0), bh = values.size(1), bw = values.size(2);
  const int64_t br = rows / bh, bc = cols / bw;
  const int64_t* crow_p = crow.data_ptr<int64_t>();
  const int64_t* col_p = col.data_ptr<int64_t>();

  // Counting sort of the blocks by column. Visiting block rows in ascending
  // order makes each new row come out sorted by the original block row. This
  // O(nnz) index pass is serial; the O(nnz * bh * bw) value copy below is the
  // part worth parallelising.
  auto crow_t = allocate_row_pointer(bc + 1, crow.options(), "bsr_transpose", "cols");
  int64_t* crow_t_p = crow_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < nnz; ++b) ++crow_t_p[col_p[b] + 1];
  for (int64_t c = 0; c < bc; ++c) crow_t_p[c + 1] += crow_t_p[c];
  std::vector<int64_t> next(crow_t_p, crow_t_p + bc);
  std::vector<int64_t> source(nnz);
  auto col_t = at::empty({nnz}, col.options());
  int64_t* col_t_p = col_t.data_ptr<int64_t>();
  for (int64_t r = 0; r < br; ++r) {
    for (int64_t b = crow_p[r]; b < crow_p[r + 1]; ++b) {
      const int64_t c = col_p[b];
      const int64_t pos = next[c]++;
      // Rows arrive in ascending order, so a column listed twice in row r
      // shows up as r already at the end of that column's list. This serial
      // pass is the last check: the parallel copy below never throws.
      TORCH_CHECK_VALUE(pos == crow_t_p[c] || col_t_p[pos - 1] != r,
                        "bsr_transpose: col_indices lists block column ", c, " twice in block row ",
                        r, "; a BSR row holds each column at most once");
      source[pos] = b;
      col_t_p[pos] = r;
    }
  }

  auto values_t = at::empty({nnz, bw, bh}, values.options());
  dispatch_by_element_size(values.element_size(), "bsr_transpose", [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* src = static_cast<const Bits*>(values.data_ptr());
    Bits* dst = static_cast<Bits*>(values_t.data_ptr());
    at::parallel_for(0, nnz, row_grain(bh * bw), [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end; ++pos) {
        const Bits* s = src + source[pos] * bh * bw;
        Bits* d = dst + pos * bh * bw;
        for (int64_t i = 0; i < bh; ++i)
          for (int64_t j = 0; j < bw; ++j) d[j * bh + i] = s[i * bw + j];
      }
    });
  });
  return {crow_t, col_t, values_t};
}

std::tuple<at::Tensor, at::Tensor> compress_2to4_cpu(const at::Tensor& weight_in,
                                                     const c10::optional<at::Tensor>& mask_in) {
  check_compress_2to4_args(weight_in, mask_in);
  const auto weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t rows = weight.size(0), cols = weight.size(1), groups = cols / 4;
  const int64_t words = meta_words_per_row(cols);
  auto values = at::empty({rows, cols / 2}, weight.options());
  auto metadata = at::zeros({rows, words}, weight.options().dtype(at::kInt));
  const uint8_t* m = mask.defined() ? mask_bytes(mask) : nullptr;
  int32_t* meta = metadata.data_ptr<int32_t>();

  // A bad group is recorded per row and reported after the loop, so that the
  // error names the first bad group in row-major order whatever the thread
  // schedule (as the CUDA version and the Python reference do).
  std::vector<int64_t> bad_group(rows, -1);
  std::vector<int> bad_count(rows, 0);
  dispatch_by_element_size(weight.element_size(), "compress_2to4", [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* w = static_cast<const Bits*>(weight.data_ptr());
    Bits* v = static_cast<Bits*>(values.data_ptr());
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t base = r * cols + 4 * g;
          int kept[4];
          int n_kept = 0;
          for (int s = 0; s < 4; ++s) {
            const bool keep = m ? m[base + s] != 0 : !bits_are_zero(w[base + s]);
            if (keep) kept[n_kept++] = s;
          }
          if (n_kept > 2) {
            bad_group[r] = g;
            bad_count[r] = n_kept;
            break;
          }
          // Pad with the lowest free slots (stored as +0) so that every group
          // codes two distinct ascending slots, as the hardware format needs.
          bool real[2] = {n_kept > 0, n_kept > 1};
          for (int s = 0; n_kept < 2 && s < 4; ++s) {
            if (n_kept == 1 && kept[0] == s) continue;
            kept[n_kept++] = s;
          }
          if (kept[0] > kept[1]) {
            std::swap(kept[0], kept[1]);
            std::swap(real[0], real[1]);
          }
          v[r * (cols / 2) + 2 * g] = real[0] ? w[base + kept[0]] : Bits(0);
          v[r * (cols / 2) + 2 * g + 1] = real[1] ? w[base + kept[1]] : Bits(0);
          const uint32_t code = static_cast<uint32_t>(kept[0] | (kept[1] << 2));
          uint32_t& word = reinterpret_cast<uint32_t&>(meta[r * words + g / kGroupsPerMetaWord]);
          word |= code << (4 * (g % kGroupsPerMetaWord));
        }
      }
    });
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = bad_group[r];
    TORCH_CHECK_VALUE(g < 0, "compress_2to4: row ", r, ", columns ", 4 * g, "..", 4 * g + 3, " keep ",
                      bad_count[r], " ", m ? "entries in mask" : "nonzero weights",
                      "; 2:4 allows at most 2 in every group of 4 along in_features");
  }
  return {values, metadata};
}

at::Tensor decompress_2to4_cpu(const at::Tensor& values_in, const at::Tensor& metadata_in) {
  check_decompress_2to4_args(values_in, metadata_in);
  const auto values = values_in.contiguous();
  const auto metadata = metadata_in.contiguous();
  const int64_t rows = values.size(0), cols = values.size(1) * 2, groups = cols / 4;
  const int64_t words = metadata.size(1);
  auto weight = at::zeros({rows, cols}, values.options());
  const int32_t* meta = metadata.data_ptr<int32_t>();
  std::vector<int64_t> bad_group(rows, -1);  // first corrupt code per row, reported in order
  dispatch_by_element_size(values.element_size(), "decompress_2to4", [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* v = static_cast<const Bits*>(values.data_ptr());
    Bits* w = static_cast<Bits*>(weight.data_ptr());
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const uint32_t word = static_cast<uint32_t>(meta[r * words + g / kGroupsPerMetaWord]);
          const uint32_t code = (word >> (4 * (g % kGroupsPerMetaWord))) & 0xF;
          const int i0 = code & 3, i1 = code >> 2;
          // A corrupt code (i0 >= i1) would silently overwrite a value.
          if (i0 >= i1) {
            bad_group[r] = g;
            break;
          }
          w[r * cols + 4 * g + i0] = v[r * (cols / 2) + 2 * g];
          w[r * cols + 4 * g + i1] = v[r * (cols / 2) + 2 * g + 1];
        }
      }
    });
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = bad_group[r];
    if (g < 0) continue;
    const uint32_t word = static_cast<uint32_t>(meta[r * words + g / kGroupsPerMetaWord]);
    const uint32_t code = (word >> (4 * (g % kGroupsPerMetaWord))) & 0xF;
    TORCH_CHECK_VALUE(false, "decompress_2to4: metadata row ", r, " group ", g, " codes slots (",
                      code & 3, ", ", code >> 2, "); a valid code holds two ascending slots");
  }
  return weight;
}

// ---------------------------------------------------------------------------
// Schemas. Fake (meta) implementations are registered in Python
// (lotus_kernels/ops/mask_compaction.py); set_python_module tells torch where to find them.
// ---------------------------------------------------------------------------

TORCH_LIBRARY(lotus_kernels, m) {
  m.set_python_module("lotus_kernels.ops.mask_compaction");
  m.def("keep_indices(Tensor keep_mask) -> (Tensor indices, Tensor counts)");
  m.def(
      "dense_to_bsr(Tensor weight, Tensor block_mask, int block_rows, int block_cols) "
      "-> (Tensor crow_indices, Tensor col_indices, Tensor values)");
  m.def(
      "bsr_transpose(Tensor crow_indices, Tensor col_indices, Tensor values, int rows, int cols) "
      "-> (Tensor crow_indices, Tensor col_indices, Tensor values)");
  m.def("compress_2to4(Tensor weight, Tensor? mask=None) -> (Tensor values, Tensor metadata)");
  m.def("decompress_2to4(Tensor values, Tensor metadata) -> Tensor");
}

TORCH_LIBRARY_IMPL(lotus_kernels, CPU, m) {
  m.impl("keep_indices", &keep_indices_cpu);
  m.impl("dense_to_bsr", &dense_to_bsr_cpu);
  m.impl("bsr_transpose", &bsr_transpose_cpu);
  m.impl("compress_2to4", &compress_2to4_cpu);
  m.impl("decompress_2to4", &decompress_2to4_cpu);
}

}  // namespace lotus_kernels
