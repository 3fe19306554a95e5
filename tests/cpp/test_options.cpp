// The one table of HOSTFUSE_* options: parsing, ranges, defaults, and the
// docs page generated from it.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/cuda/config.h>
#include <hostfuse/utils/options.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::ScopedEnvironment;

TEST(Options, UnsetAndEmptyGiveTheDefault) {
  ScopedEnvironment empty("HOSTFUSE_MOE_TIMEOUT_S", "");
  EXPECT_FALSE(options::getNumber(Option::MoeTimeoutS).has_value());
  EXPECT_EQ(options::numberOr(Option::MoeTimeoutS), 30.0);
  ::unsetenv("HOSTFUSE_MOE_TIMEOUT_S");
  EXPECT_EQ(options::numberOr(Option::MoeTimeoutS), 30.0);
  EXPECT_FALSE(options::getInt(Option::MoeBlocks).has_value());
  EXPECT_TRUE(options::boolOr(Option::MoeCooperative));
}

TEST(Options, ReadsValidValues) {
  ScopedEnvironment blocks("HOSTFUSE_MOE_BLOCKS", "96");
  ScopedEnvironment timeout("HOSTFUSE_MOE_TIMEOUT_S", "2.5");
  ScopedEnvironment profile("HOSTFUSE_MOE_PROFILE", "on");
  ScopedEnvironment cooperative("HOSTFUSE_MOE_COOPERATIVE", "0");
  EXPECT_EQ(options::getInt(Option::MoeBlocks), 96);
  EXPECT_EQ(options::numberOr(Option::MoeTimeoutS), 2.5);
  EXPECT_TRUE(options::boolOr(Option::MoeProfile));
  EXPECT_FALSE(options::boolOr(Option::MoeCooperative));
}

TEST(Options, RefusesWhatItsTypeDoesNotParse) {
  struct Case {
    const char* variable;
    const char* value;
    const char* expected;
  };
  const Case cases[] = {
      {"HOSTFUSE_MOE_BLOCKS", "2.5",
       "HOSTFUSE_MOE_BLOCKS=2.5 is not an integer"},
      {"HOSTFUSE_MOE_BLOCKS", "12abc", "is not an integer"},
      {"HOSTFUSE_MOE_BLOCKS", " 12", "is not an integer"},
      {"HOSTFUSE_MOE_BLOCKS", "99999999999999999999", "is not an integer"},
      {"HOSTFUSE_MOE_TIMEOUT_S", "inf", "is not a finite number"},
      {"HOSTFUSE_MOE_TIMEOUT_S", "nan", "is not a finite number"},
      {"HOSTFUSE_MOE_TIMEOUT_S", "3s", "is not a finite number"},
      {"HOSTFUSE_MOE_TIMEOUT_S", "0x10", "is not a finite number"},
      {"HOSTFUSE_MOE_PROFILE", "2", "is not a boolean"},
      {"HOSTFUSE_MOE_PROFILE", "maybe", "is not a boolean"},
  };
  for (const Case& c : cases) {
    ScopedEnvironment v(c.variable, c.value);
    test::expectErrorContains(
        [&] {
          const options::Spec* s = options::begin();
          while (std::string(s->variable) != c.variable) {
            ++s;
          }
          options::check(s->option);
        },
        {c.expected});
  }
}

TEST(Options, RefusesValuesOutOfRange) {
  {
    ScopedEnvironment v("HOSTFUSE_MOE_TIMEOUT_S", "0");
    test::expectErrorContains(
        [] { options::numberOr(Option::MoeTimeoutS); },
        {"HOSTFUSE_MOE_TIMEOUT_S=0 is out of range", "[0.001, 86400]"});
  }
  {
    ScopedEnvironment v("HOSTFUSE_MOE_BLOCKS", "0");
    test::expectErrorContains(
        [] { options::getInt(Option::MoeBlocks); },
        {"HOSTFUSE_MOE_BLOCKS=0 is out of range: it must be an integer in "
         "[1, 1000000]"});
  }
  {
    ScopedEnvironment v("HOSTFUSE_COMM_TIMEOUT_S", "-5");
    test::expectErrorContains([] { options::numberOr(Option::CommTimeoutS); },
                              {"HOSTFUSE_COMM_TIMEOUT_S=-5 is out of range"});
  }
}

// Every timeout variable takes a positive, finite number of seconds, at
// most a day: 0 (a zero-length wait), inf, nan and longer waits are
// refused with the variable and the value named.
TEST(Options, EveryTimeoutIsPositiveFiniteAndAtMostADay) {
  int timeouts = 0;
  for (const options::Spec* s = options::begin(); s != options::end(); ++s) {
    const std::string variable = s->variable;
    if (variable.find("TIMEOUT") == std::string::npos) {
      continue;
    }
    ++timeouts;
    SCOPED_TRACE(variable);
    EXPECT_EQ(s->type, options::Type::Number);
    EXPECT_EQ(s->min, 0.001);
    EXPECT_EQ(s->max, 86400.0);
    for (const char* good : {"0.001", "2.5", "86400"}) {
      ScopedEnvironment v(s->variable, good);
      EXPECT_EQ(options::numberOr(s->option), std::stod(good));
    }
    for (const char* bad :
         {"0", "-1", "0.0009", "86400.5", "1e6", "inf", "nan", "1e999"}) {
      ScopedEnvironment v(s->variable, bad);
      test::expectErrorContains([&] { options::numberOr(s->option); },
                                {variable + "=" + bad});
    }
  }
  EXPECT_EQ(timeouts, 2);
}

// CudaMoeConfig::timeout_s, which takes precedence over
// HOSTFUSE_MOE_TIMEOUT_S unless it is 0, has the variable's range: a tiny
// value would otherwise be a zero-nanosecond wait.
TEST(Options, CudaMoeConfigTimeoutHasTheVariablesRange) {
  CudaMoeConfig config;
  config.num_experts = 2;
  config.max_tokens = 4;
  config.hidden = 8;
  config.topk = 1;
  for (const double bad :
       {1e-12, -1.0, 86401.0, std::numeric_limits<double>::infinity(),
        std::numeric_limits<double>::quiet_NaN()}) {
    config.timeout_s = bad;
    std::ostringstream value;
    value << bad;
    test::expectErrorContains(
        [&] { resolveLaunch(config, 4); },
        {"CudaMoeConfig::timeout_s = " + value.str() + " s", "[0.001, 86400]"});
  }
  config.timeout_s = 2.5;
  EXPECT_EQ(resolveLaunch(config, 4).timeout_ns, 2'500'000'000u);
  config.timeout_s = 0;
  ScopedEnvironment variable("HOSTFUSE_MOE_TIMEOUT_S", "7");
  EXPECT_EQ(resolveLaunch(config, 4).timeout_ns, 7'000'000'000u);
}

// A communicator built from a config (rather than from the environment)
// checks its timeout like HOSTFUSE_COMM_TIMEOUT_S.
TEST(Options, CommunicatorConfigTimeoutHasTheVariablesRange) {
  CommunicatorConfig config;  // a world of one
  config.timeout = std::chrono::milliseconds(0);
  test::expectErrorContains(
      [&] { Communicator communicator(config); },
      {"CommunicatorConfig::timeout = 0 s", "[0.001, 86400]"});
  config.timeout = std::chrono::hours(25);
  test::expectErrorContains([&] { Communicator communicator(config); },
                            {"CommunicatorConfig::timeout = 90000 s"});
  config.timeout = std::chrono::seconds(5);
  Communicator communicator(config);
  EXPECT_EQ(communicator.config().timeout, std::chrono::seconds(5));
}

// The communicator's config default and the option's default are one
// number.
TEST(Options, CommunicatorTimeoutDefaultIsTheOptionsDefault) {
  ScopedEnvironment unset("HOSTFUSE_COMM_TIMEOUT_S", "");
  EXPECT_EQ(options::numberOr(Option::CommTimeoutS),
            static_cast<double>(CommunicatorConfig::kDefaultTimeoutSeconds));
  EXPECT_EQ(CommunicatorConfig::fromEnvironment().timeout,
            CommunicatorConfig().timeout);
}

TEST(Options, EveryOptionIsDeclaredOnceInOrder) {
  int index = 0;
  for (const options::Spec* s = options::begin(); s != options::end(); ++s) {
    EXPECT_EQ(static_cast<int>(s->option), index++) << s->variable;
    EXPECT_EQ(std::string(s->variable).rfind("HOSTFUSE_", 0), 0u);
    EXPECT_LE(s->min, s->max) << s->variable;
    EXPECT_NE(std::string(s->doc), "") << s->variable;
    EXPECT_EQ(&options::spec(s->option), s);
  }
  EXPECT_GE(index, 9);
}

// docs/options.md must show exactly the table the code declares:
// regenerate it with `build/print_options --markdown`.
TEST(Options, DocsPageListsEveryOption) {
  const char* root = std::getenv("HOSTFUSE_SOURCE_DIR");
  if (root == nullptr) {
    GTEST_SKIP() << "HOSTFUSE_SOURCE_DIR is not set (ctest sets it)";
  }
  std::ifstream page(std::string(root) + "/docs/options.md");
  ASSERT_TRUE(page.good()) << "no docs/options.md under " << root;
  std::stringstream text;
  text << page.rdbuf();
  EXPECT_NE(text.str().find(options::markdownTable()), std::string::npos)
      << "docs/options.md is out of date; its table must be:\n"
      << options::markdownTable();
}

}  // namespace
}  // namespace hostfuse
