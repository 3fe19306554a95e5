// main() of the multi-rank gtest binaries (test_multidevice,
// test_graph_moe), which tools/launch.sh runs as N ranks: every rank runs
// every test; rank 0 prints gtest's usual output, the others only their
// failures, and each rank ends with one line of counts.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <iostream>

#include <hostfuse/multidevice/comm/communicator.h>

namespace {

// On ranks other than 0: print only failures, each marked with the rank,
// so N ranks do not print N copies of every passing test.
class FailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int64_t rank) : rank_(rank) {}

  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (result.failed()) {
      std::cout << "[rank " << rank_ << "] "
                << (result.file_name() ? result.file_name() : "") << ":"
                << result.line_number() << ": Failure\n"
                << result.message() << std::endl;
    }
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::cout << "[rank " << rank_ << "] [  FAILED  ] "
                << info.test_suite_name() << "." << info.name() << std::endl;
    }
  }

 private:
  int64_t rank_;
};

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  hostfuse::Communicator& comm = hostfuse::Communicator::getInstance();
  if (comm.rank() != 0) {
    testing::TestEventListeners& listeners =
        testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(comm.rank()));
  }
  const int status = RUN_ALL_TESTS();
  // A test may have replaced the process-wide communicator after a rank
  // failed (Communicator::recoverInstance): count over, and shut down, the
  // one in use now.
  hostfuse::Communicator& now = hostfuse::Communicator::getInstance();
  const testing::UnitTest& unit = *testing::UnitTest::GetInstance();
  std::cout << "[rank " << now.rank() << " of " << now.size() << "] "
            << unit.successful_test_count() << " passed, "
            << unit.failed_test_count() << " failed, "
            << unit.skipped_test_count() << " skipped" << std::endl;
  // When no rank ran a test (all skipped, none failed), rank 0 says so on a
  // line that ctest reports as a skip (SKIP_REGULAR_EXPRESSION in
  // tests/cpp/CMakeLists.txt) rather than as a pass that ran nothing.
  std::vector<at::Tensor> ran = {at::tensor({static_cast<int64_t>(
      unit.successful_test_count() + unit.failed_test_count())})};
  try {
    now.backend(c10::DeviceType::CPU).allreduce(ran)->wait();
    if (now.rank() == 0 && ran[0].item<int64_t>() == 0 &&
        unit.skipped_test_count() > 0) {
      std::cout << "[rank 0] every test skipped on every rank" << std::endl;
    }
  } catch (const std::exception& e) {
    std::cout << "[rank " << now.rank()
              << "] could not count the tests of the other ranks: " << e.what()
              << std::endl;
  }
  try {
    now.shutdown();
  } catch (const std::exception& e) {
    std::cout << "[rank " << now.rank() << "] shutdown failed: " << e.what()
              << std::endl;
    return 1;
  }
  return status;
}
