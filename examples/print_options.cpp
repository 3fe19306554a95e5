// Prints every HOSTFUSE_* environment variable the library reads, from the
// one table that declares them (csrc/utils/options.h): as Markdown (what
// docs/options.md shows) or as plain text with the values set now.
//
//   build/print_options [--markdown | --current | --help]
#include <cstdio>
#include <cstring>
#include <string>

#include "utils/exceptions.h"
#include "utils/options.h"

namespace {

void printUsage(FILE* out) {
  std::fprintf(out,
               "usage: print_options [--markdown | --current | --help]\n"
               "  --markdown  the table of every HOSTFUSE_* variable, as "
               "docs/options.md has it (the default)\n"
               "  --current   each variable with its value in this "
               "environment, checked\n"
               "  --help      this text\n");
}

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
  const std::string mode = argc > 1 ? argv[1] : "--markdown";
  if (argc > 2 || mode == "--help" || mode == "-h") {
    printUsage(argc > 2 ? stderr : stdout);
    return argc > 2 ? 2 : 0;
  }
  if (mode == "--markdown") {
    std::fputs(hostfuse::options::markdownTable().c_str(), stdout);
    return 0;
  }
  if (mode == "--current") {
    return printCurrent();
  }
  std::fprintf(stderr, "print_options: unknown argument '%s'\n", mode.c_str());
  printUsage(stderr);
  return 2;
}
