// C++ tests of the mask-compaction ops through the dispatcher (so the
// TORCH_LIBRARY registration is exercised too), run by ctest. Exact equality
// everywhere: these ops only move values. With a CUDA device present, the
// CUDA implementations are compared against the CPU ones.
#include "mask_compaction.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/cuda.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

int g_passed = 0, g_failed = 0;

#define EXPECT(cond)                                                              \
  do {                                                                           \
    if (!(cond)) throw std::runtime_error(std::string("EXPECT failed: ") + #cond); \
  } while (0)

void run(const std::string& name, const std::function<void()>& test) {
  try {
    test();
    ++g_passed;
    std::cout << "PASS " << name << "\n";
  } catch (const std::exception& e) {
    ++g_failed;
    const std::string what = e.what();
    std::cout << "FAIL " << name << ": " << what.substr(0, what.find('\n')) << "\n";
  }
}

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

c10::TypedOperatorHandle<Pair(const at::Tensor&)> keep_indices_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lotus_kernels::keep_indices", "")
      .typed<Pair(const at::Tensor&)>();
}
c10::TypedOperatorHandle<Triple(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>
dense_to_bsr_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lotus_kernels::dense_to_bsr", "")
      .typed<Triple(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
}
c10::TypedOperatorHandle<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t)>
bsr_transpose_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lotus_kernels::bsr_transpose", "")
      .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
}
c10::TypedOperatorHandle<Pair(const at::Tensor&, const std::optional<at::Tensor>&)> compress_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lotus_kernels::compress_2to4", "")
      .typed<Pair(const at::Tensor&, const std::optional<at::Tensor>&)>();
}
c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> decompress_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("lotus_kernels::decompress_2to4", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && at::equal(a.cpu(), b.cpu());
}

// A weight whose block mask has an all-pruned block row (1), a fully kept
// block row (2) and kept first/last blocks (0), with random nonzero values.
std::tuple<at::Tensor, at::Tensor> awkward_block_case(int64_t bh, int64_t bw) {
  const int64_t br = 4, bc = 5;
  auto block_mask = at::zeros({br, bc}, at::kBool);
  block_mask[0][0] = true;
  block_mask[0][bc - 1] = true;
  block_mask[2].fill_(true);
  block_mask[3][2] = true;
  auto weight = at::randn({br * bh, bc * bw}) + 3.0;  // no exact zeros
  auto element_mask = block_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1);
  return {weight * element_mask, block_mask};
}

void test_keep_indices_hand_rows() {
  // rows: empty, full, first only, last only, alternating
  auto mask = at::zeros({5, 7}, at::kBool);
  mask[1].fill_(true);
  mask[2][0] = true;
  mask[3][6] = true;
  for (int j = 0; j < 7; j += 2) mask[4][j] = true;
  auto [idx, cnt] = keep_indices_op().call(mask);
  EXPECT(idx.scalar_type() == at::kInt && cnt.scalar_type() == at::kInt);
  std::vector<std::vector<int>> expected = {{-1, -1, -1, -1, -1, -1, -1},
                                            {0, 1, 2, 3, 4, 5, 6},
                                            {0, -1, -1, -1, -1, -1, -1},
                                            {6, -1, -1, -1, -1, -1, -1},
                                            {0, 2, 4, 6, -1, -1, -1}};
  std::vector<int> expected_counts = {0, 7, 1, 1, 4};
  for (int r = 0; r < 5; ++r) {
    EXPECT(cnt[r].item<int>() == expected_counts[r]);
    for (int j = 0; j < 7; ++j) EXPECT(idx[r][j].item<int>() == expected[r][j]);
  }
}

void test_dense_to_bsr_matches_torch() {
  for (auto [bh, bw] : std::vector<std::pair<int64_t, int64_t>>{{16, 16}, {16, 32}, {32, 16}, {4, 8}}) {
    auto [weight, block_mask] = awkward_block_case(bh, bw);
    auto [crow, col, values] = dense_to_bsr_op().call(weight, block_mask, bh, bw);
    auto expected = weight.to_sparse_bsr({bh, bw});
    EXPECT(same(crow, expected.crow_indices()));
    EXPECT(same(col, expected.col_indices()));
    EXPECT(same(values, expected.values()));
  }
}

void test_bsr_transpose_matches_torch() {
  auto [weight, block_mask] = awkward_block_case(16, 32);
  auto [crow, col, values] = dense_to_bsr_op().call(weight, block_mask, 16, 32);
  auto [crow_t, col_t, values_t] =
      bsr_transpose_op().call(crow, col, values, weight.size(0), weight.size(1));
  auto expected = weight.t().contiguous().to_sparse_bsr({32, 16});
  EXPECT(same(crow_t, expected.crow_indices()));
  EXPECT(same(col_t, expected.col_indices()));
  EXPECT(same(values_t, expected.values()));
}

void test_bsr_transpose_rejects_bad_structure() {
  auto [weight, block_mask] = awkward_block_case(16, 16);
  auto [crow, col, values] = dense_to_bsr_op().call(weight, block_mask, 16, 16);
  auto bad_col = col.clone();
  bad_col[0] = 99;
  bool raised = false;
  try {
    bsr_transpose_op().call(crow, bad_col, values, weight.size(0), weight.size(1));
  } catch (const c10::ValueError&) {
    raised = true;
  }
  EXPECT(raised);
}

void test_bsr_transpose_rejects_duplicate_column_and_huge_shape() {
  // Block row 0 lists column 1 twice.
  auto crow = at::tensor({0, 2, 3}, at::kLong);
  auto col = at::tensor({1, 1, 0}, at::kLong);
  auto values = at::randn({3, 4, 4});
  bool duplicate = false;
  try {
    bsr_transpose_op().call(crow, col, values, 8, 8);
  } catch (const c10::ValueError& e) {
    duplicate = std::string(e.what()).find("twice in block row 0") != std::string::npos;
  }
  EXPECT(duplicate);
  // rows = 2^63 - 1 with 1x1 blocks: br + 1 overflowed before.
  bool huge = false;
  try {
    bsr_transpose_op().call(at::zeros({2}, at::kLong), at::zeros({0}, at::kLong), at::zeros({0, 1, 1}),
                            INT64_MAX, 1);
  } catch (const c10::ValueError& e) {
    huge = std::string(e.what()).find("at most") != std::string::npos;
  }
  EXPECT(huge);
}

void test_masks_are_read_as_bytes() {
  // Bytes 2 and 255 viewed as bool: true, exactly like 1 (loading them as bool is UB).
  auto raw = at::tensor({1, 2, 0, 255, 0, 0, 7, 0}, at::kByte).reshape({2, 4});
  auto weird = raw.view(at::kBool);
  auto clean = raw.ne(0);
  auto [idx_w, cnt_w] = keep_indices_op().call(weird);
  auto [idx_c, cnt_c] = keep_indices_op().call(clean);
  EXPECT(same(idx_w, idx_c) && same(cnt_w, cnt_c));
  auto weight = at::randn({8, 16}) + 3.0;
  auto bsr_w = dense_to_bsr_op().call(weight, weird, 4, 4);
  auto bsr_c = dense_to_bsr_op().call(weight, clean, 4, 4);
  EXPECT(same(std::get<0>(bsr_w), std::get<0>(bsr_c)) && same(std::get<1>(bsr_w), std::get<1>(bsr_c)) &&
         same(std::get<2>(bsr_w), std::get<2>(bsr_c)));
}

void test_2to4_round_trip_and_layout() {
  // One row, 12 columns (3 groups, one partial metadata word):
  // group 0 keeps slots 1,3; group 1 keeps only slot 2 (padded with slot 0);
  // group 2 keeps nothing (slots 0,1).
  auto w = at::tensor({0.f, 5.f, 0.f, -7.f, 0.f, 0.f, 2.f, 0.f, 0.f, 0.f, 0.f, 0.f}).reshape({1, 12});
  auto [values, meta] = compress_op().call(w, std::nullopt);
  EXPECT(same(values, at::tensor({5.f, -7.f, 0.f, 2.f, 0.f, 0.f}).reshape({1, 6})));
  const int32_t code = (1 | (3 << 2)) | ((0 | (2 << 2)) << 4) | ((0 | (1 << 2)) << 8);
  EXPECT(meta.sizes() == at::IntArrayRef({1, 1}) && meta[0][0].item<int32_t>() == code);
  EXPECT(same(decompress_op().call(values, meta), w));

  auto big = at::randn({33, 96});
  auto keep = at::zeros({33, 24, 4}, at::kBool);
  keep.select(2, 0).fill_(true);
  keep.select(2, 3).fill_(true);
  keep = keep.reshape({33, 96});
  auto [v2, m2] = compress_op().call(big, keep);
  EXPECT(m2.size(1) == 3);
  EXPECT(same(decompress_op().call(v2, m2), big * keep));
}

void test_2to4_rejects_three_nonzeros() {
  auto w = at::ones({2, 8});
  bool raised = false;
  try {
    compress_op().call(w, std::nullopt);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("at most 2") != std::string::npos;
  }
  EXPECT(raised);
}

void test_cuda_matches_cpu() {
  auto [weight, block_mask] = awkward_block_case(16, 16);
  auto cpu = dense_to_bsr_op().call(weight, block_mask, 16, 16);
  auto gpu = dense_to_bsr_op().call(weight.cuda(), block_mask.cuda(), 16, 16);
  EXPECT(same(std::get<0>(cpu), std::get<0>(gpu)) && same(std::get<1>(cpu), std::get<1>(gpu)) &&
        same(std::get<2>(cpu), std::get<2>(gpu)));
  auto tc = bsr_transpose_op().call(std::get<0>(cpu), std::get<1>(cpu), std::get<2>(cpu), 64, 80);
  auto tg = bsr_transpose_op().call(std::get<0>(gpu), std::get<1>(gpu), std::get<2>(gpu), 64, 80);
  EXPECT(same(std::get<0>(tc), std::get<0>(tg)) && same(std::get<1>(tc), std::get<1>(tg)) &&
        same(std::get<2>(tc), std::get<2>(tg)));
  auto mask = at::rand({9, 200}) > 0.7;
  auto kc = keep_indices_op().call(mask);
  auto kg = keep_indices_op().call(mask.cuda());
  EXPECT(same(std::get<0>(kc), std::get<0>(kg)) && same(std::get<1>(kc), std::get<1>(kg)));
  auto w = at::randn({17, 72}).to(at::kHalf);
  auto keep = at::rand({17, 18, 4}).argsort(/*dim=*/-1, /*descending=*/false).lt(2).reshape({17, 72});  // exactly 2 of 4
  auto cc = compress_op().call(w, keep);
  auto cg = compress_op().call(w.cuda(), keep.cuda());
  EXPECT(same(std::get<0>(cc), std::get<0>(cg)) && same(std::get<1>(cc), std::get<1>(cg)));
  EXPECT(same(decompress_op().call(std::get<0>(cg), std::get<1>(cg)), w * keep));
}

}  // namespace

int main() {
  at::manual_seed(0);
  run("keep_indices hand-built rows", test_keep_indices_hand_rows);
  run("dense_to_bsr equals to_sparse_bsr", test_dense_to_bsr_matches_torch);
  run("bsr_transpose equals to_sparse_bsr of W^T", test_bsr_transpose_matches_torch);
  run("bsr_transpose rejects a bad triple", test_bsr_transpose_rejects_bad_structure);
  run("bsr_transpose rejects a duplicate column and a huge shape",
      test_bsr_transpose_rejects_duplicate_column_and_huge_shape);
  run("masks are read as bytes", test_masks_are_read_as_bytes);
  run("2:4 round trip and metadata layout", test_2to4_round_trip_and_layout);
  run("2:4 rejects a group with 3 nonzeros", test_2to4_rejects_three_nonzeros);
  if (torch::cuda::is_available()) {
    run("CUDA ops equal CPU ops", test_cuda_matches_cpu);
  } else {
    std::cout << "SKIP CUDA ops equal CPU ops (no CUDA device)\n";
  }
  std::cout << g_passed << " passed, " << g_failed << " failed\n";
  return g_failed == 0 ? 0 : 1;
}
