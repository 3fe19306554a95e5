// Helpers shared by the gtest binaries.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

namespace hostfuse::test {

// The devices a device-parameterized test runs on: CPU, and CUDA when a GPU
// is present (the CUDA instance skips itself otherwise).
std::vector<at::Device> testDevices();

// Skips the current test when `device` is CUDA and no GPU is present.
// Use as: HF_SKIP_IF_UNAVAILABLE(device);
bool deviceUnavailable(const at::Device& device);
#define HF_SKIP_IF_UNAVAILABLE(device)                  \
  do {                                                  \
    if (::hostfuse::test::deviceUnavailable(device)) {  \
      GTEST_SKIP() << "no CUDA device on this machine"; \
    }                                                   \
  } while (false)

// Random values from a fixed seed, never all zeros.
at::Tensor randomTensor(at::IntArrayRef sizes, at::ScalarType dtype,
                        const at::Device& device, uint64_t seed);

// Asserts that `actual` and `expected` have the same dtype and sizes and
// are close within the tolerances (exact when both are zero).
void expectClose(const at::Tensor& actual, const at::Tensor& expected,
                 double rtol = 0.0, double atol = 0.0);

// Runs `fn` and checks that it throws hostfuse::Error whose message
// contains every string in `fragments`.
template <typename Fn>
void expectErrorContains(Fn&& fn, const std::vector<std::string>& fragments);

// Sets an environment variable while alive and restores its previous value
// (or unsets it) after.
class ScopedEnvironment {
 public:
  ScopedEnvironment(const char* name, const char* value);
  ~ScopedEnvironment();
  ScopedEnvironment(const ScopedEnvironment&) = delete;
  ScopedEnvironment& operator=(const ScopedEnvironment&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// Name of a device for parameterized test names: "cpu", "cuda".
std::string deviceName(const testing::TestParamInfo<at::Device>& info);

}  // namespace hostfuse::test

#include "test_utils_inl.h"
