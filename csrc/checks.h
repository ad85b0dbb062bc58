// CHECK_* macros used at the C++ boundary of every fastllm op. Each names the argument and what is wrong.
#pragma once
#include <ATen/ATen.h>

#define FASTLLM_CHECK(cond, ...) TORCH_CHECK(cond, "fastllm: ", __VA_ARGS__)
#define CHECK_CONTIGUOUS(t) FASTLLM_CHECK((t).is_contiguous(), #t " must be contiguous")
#define CHECK_DEVICE(t, dev) \
  FASTLLM_CHECK((t).device() == (dev), #t " is on ", (t).device(), " but expected ", (dev))
#define CHECK_DTYPE(t, dt) \
  FASTLLM_CHECK((t).scalar_type() == (dt), #t " has dtype ", (t).scalar_type(), " but expected ", (dt))
#define CHECK_FLOATING(t)                                                                      \
  FASTLLM_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16 ||       \
                    (t).scalar_type() == at::kHalf,                                             \
                #t " must be float32, bfloat16 or float16, got ", (t).scalar_type())
#define CHECK_SHAPE(t, ...)                                                                    \
  FASTLLM_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " has shape ", (t).sizes(), \
                " but expected ", at::IntArrayRef({__VA_ARGS__}))
