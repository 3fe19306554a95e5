#include "test_utils.h"

#include <cstdlib>

#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse::test {

std::vector<at::Device> testDevices() {
  return {at::Device(at::kCPU), at::Device(at::kCUDA, 0)};
}

bool deviceUnavailable(const at::Device& device) {
  return device.is_cuda() && !cuda::isAvailable();
}

at::Tensor randomTensor(at::IntArrayRef sizes, at::ScalarType dtype,
                        const at::Device& device, uint64_t seed) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  at::Tensor values;
  if (at::isFloatingType(dtype)) {
    values = at::randn(sizes, generator, at::dtype(at::kFloat));
  } else if (dtype == at::kBool) {
    values = at::randint(0, 2, sizes, generator, at::dtype(at::kLong));
  } else {
    values = at::randint(-50, 50, sizes, generator, at::dtype(at::kLong));
  }
  return values.to(dtype).to(device);
}

void expectClose(const at::Tensor& actual, const at::Tensor& expected,
                 double rtol, double atol) {
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type());
  ASSERT_EQ(actual.sizes(), expected.sizes());
  const at::Tensor a = actual.cpu();
  const at::Tensor e = expected.cpu();
  if (rtol == 0.0 && atol == 0.0) {
    EXPECT_TRUE(at::equal(a, e))
        << "max abs difference "
        << (a.to(at::kDouble) - e.to(at::kDouble)).abs().max().item<double>();
    return;
  }
  EXPECT_TRUE(at::allclose(a.to(at::kDouble), e.to(at::kDouble), rtol, atol))
      << "max abs difference "
      << (a.to(at::kDouble) - e.to(at::kDouble)).abs().max().item<double>()
      << " (rtol " << rtol << ", atol " << atol << ")";
}

std::string deviceName(const testing::TestParamInfo<at::Device>& info) {
  return info.param.is_cuda() ? "cuda" : "cpu";
}

ScopedEnvironment::ScopedEnvironment(const char* name, const char* value)
    : name_(name) {
  if (const char* old = std::getenv(name)) {
    old_ = old;
  }
  ::setenv(name, value, 1);
}

ScopedEnvironment::~ScopedEnvironment() {
  if (old_.has_value()) {
    ::setenv(name_.c_str(), old_->c_str(), 1);
  } else {
    ::unsetenv(name_.c_str());
  }
}

}  // namespace hostfuse::test
