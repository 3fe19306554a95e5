// Prints every HOSTFUSE_* environment variable the library reads, from the
// one table that declares them (csrc/hostfuse/utils/options.h): as Markdown
// (what docs/options.md shows) or as plain text with the values set now.
//
//   build/print_options [--markdown | --current | --help]
#include <cstdio>
#include <optional>
#include <string>

#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/options.h>
#include "cli_flags.h"

namespace {

// Each option, its value here (or "unset"), and whether the value is valid.
int printCurrent() {
  using namespace hostfuse;
  int bad = 0;
  for (const options::Spec* s = options::begin(); s != options::end(); ++s) {
    const std::optional<std::string> value = options::environment(s->variable);
    std::string verdict = value ? "ok" : "unset";
    try {
      options::check(s->option);
    } catch (const Error& e) {
      verdict = e.what();
      ++bad;
    }
    std::printf("%-36s %-10s %s\n", s->variable, value ? value->c_str() : "-",
                verdict.c_str());
  }
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  bool markdown = false;
  bool current = false;
  hostfuse::cli::Flags flags(
      "print_options",
      "Prints every HOSTFUSE_* environment variable the library reads, from "
      "the one table that declares them (csrc/hostfuse/utils/options.h).");
  flags.option("--markdown", &markdown,
               "the table of every variable, as docs/options.md "
               "has it (the default)");
  flags.option("--current", &current,
               "each variable with its value in this environment, checked; "
               "exit status 1 if one is invalid");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (markdown && current) {
    return flags.fail("--markdown and --current exclude each other");
  }
  if (current) {
    return printCurrent();
  }
  std::fputs(hostfuse::options::markdownTable().c_str(), stdout);
  return 0;
}
