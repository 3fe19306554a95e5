// examples/cli_flags.h, the flag parser of the example and benchmark
// programs: values taken and refused (with the flag named and exit status
// 2), --help, the usage text, and silence on ranks other than 0.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "../../examples/cli_flags.h"

namespace hostfuse::cli {
namespace {

struct Values {
  int64_t tokens = 8;
  std::vector<int64_t> sizes = {1, 2};
  bool cpu = false;
  std::string csv;
  std::string mode = "both";
};

Flags makeFlags(Values& v) {
  Flags flags("prog", "What prog does.");
  flags.integer("--tokens", "T", &v.tokens, 1, 100, "tokens per rank");
  flags.integerList("--sizes", "S1,S2", &v.sizes, 0, 10, "sizes");
  flags.option("--cpu", &v.cpu, "CPU tensors");
  flags.text("--csv", "FILE", &v.csv, "append rows here", "none");
  flags.choice("--mode", "MODE", &v.mode, {"ll", "ht", "both"}, "modes");
  return flags;
}

// Parses `args` (after the program name); the status parse() returned, and
// what it printed on stderr.
struct Parsed {
  std::optional<int> status;
  std::string errors;
};

Parsed parse(Values& v, std::vector<std::string> args) {
  std::vector<char*> argv = {const_cast<char*>("prog")};
  for (std::string& arg : args) {
    argv.push_back(arg.data());
  }
  Flags flags = makeFlags(v);
  testing::internal::CaptureStderr();
  Parsed parsed;
  parsed.status = flags.parse(static_cast<int>(argv.size()), argv.data());
  parsed.errors = testing::internal::GetCapturedStderr();
  return parsed;
}

class CliFlags : public testing::Test {
 protected:
  // The parser is quiet on ranks other than 0; these tests are rank 0.
  void SetUp() override { unsetenv("RANK"); }
};

TEST_F(CliFlags, TakesEveryKindOfValue) {
  Values v;
  const Parsed p = parse(v, {"--tokens", "12", "--sizes=3,0,10", "--cpu",
                             "--csv", "out.csv", "--mode", "ht"});
  EXPECT_EQ(p.status, std::nullopt) << p.errors;
  EXPECT_EQ(v.tokens, 12);
  EXPECT_EQ(v.sizes, (std::vector<int64_t>{3, 0, 10}));
  EXPECT_TRUE(v.cpu);
  EXPECT_EQ(v.csv, "out.csv");
  EXPECT_EQ(v.mode, "ht");
}

TEST_F(CliFlags, SaysWhichFlagsWereGiven) {
  Values v;
  Flags flags = makeFlags(v);
  char prog[] = "prog";
  char tokens[] = "--tokens=3";
  char cpu[] = "--cpu";
  char* argv[] = {prog, tokens, cpu};
  ASSERT_EQ(flags.parse(3, argv), std::nullopt);
  EXPECT_TRUE(flags.given("--tokens"));
  EXPECT_TRUE(flags.given("--cpu"));
  EXPECT_FALSE(flags.given("--csv"));
  EXPECT_FALSE(flags.given("--tok"));
  ASSERT_EQ(flags.parse(1, argv), std::nullopt);
  EXPECT_FALSE(flags.given("--tokens")) << "only the last parse counts";
}

TEST_F(CliFlags, KeepsDefaultsOfFlagsNotGiven) {
  Values v;
  EXPECT_EQ(parse(v, {}).status, std::nullopt);
  EXPECT_EQ(v.tokens, 8);
  EXPECT_EQ(v.sizes, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(v.mode, "both");
  EXPECT_TRUE(v.csv.empty());
}

TEST_F(CliFlags, RefusesBadValuesNamingTheFlagWithStatus2) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--tokens", "0"}, "--tokens expects an integer from 1 to 100, got '0'"},
      {{"--tokens", "12x"},
       "--tokens expects an integer from 1 to 100, got '12x'"},
      {{"--tokens"}, "--tokens needs a value"},
      {{"--sizes", "1,,2"}, "--sizes expects one or more comma-separated"},
      {{"--cpu=1"}, "--cpu takes no value"},
      {{"--csv", ""}, "--csv expects a non-empty string, got ''"},
      // A text flag followed by a flag: no value, not a file named
      // "--tokens".
      {{"--csv", "--tokens", "4"}, "--csv needs a value"},
      {{"--mode", "fast"}, "--mode expects ll, ht or both, got 'fast'"},
      {{"--nope"}, "unknown flag '--nope'"},
      {{"stray"}, "unexpected argument 'stray'"},
  };
  for (const auto& [args, message] : cases) {
    Values v;
    const Parsed p = parse(v, args);
    EXPECT_EQ(p.status, 2) << args[0];
    EXPECT_NE(p.errors.find("prog: " + message), std::string::npos) << p.errors;
    EXPECT_NE(p.errors.find("(see --help)"), std::string::npos);
  }
}

TEST_F(CliFlags, TakesATextValueStartingWithADashAfterAnEqualsSign) {
  Values v;
  EXPECT_EQ(parse(v, {"--csv=-odd.csv"}).status, std::nullopt);
  EXPECT_EQ(v.csv, "-odd.csv");
}

TEST_F(CliFlags, HelpPrintsEveryFlagWithItsRangeAndDefault) {
  Values v;
  Flags flags = makeFlags(v);
  const std::string usage = flags.usage();
  for (const char* text :
       {"usage: prog [--tokens T] [--sizes S1,S2] [--cpu] [--csv FILE]",
        "What prog does.", "an integer from 1 to 100; default 8",
        "a non-empty string; default none", "ll, ht or both; default both",
        "-h, --help"}) {
    EXPECT_NE(usage.find(text), std::string::npos) << text << "\n" << usage;
  }
  testing::internal::CaptureStdout();
  char prog[] = "prog";
  char help[] = "--help";
  char* argv[] = {prog, help};
  EXPECT_EQ(flags.parse(2, argv), 0);
  EXPECT_EQ(testing::internal::GetCapturedStdout(), usage);
}

TEST_F(CliFlags, RanksOtherThanZeroRefuseSilently) {
  setenv("RANK", "1", 1);
  Values v;
  const Parsed p = parse(v, {"--tokens", "0"});
  unsetenv("RANK");
  EXPECT_EQ(p.status, 2);
  EXPECT_TRUE(p.errors.empty()) << p.errors;
}

}  // namespace
}  // namespace hostfuse::cli
