// Command-line flags of the example and benchmark programs: one parser, so
// that every program answers --help alike (what it does, each flag with its
// range and default) and refuses a bad command line with one line on stderr
// that names the flag and what it expects, and exit status 2. Header-only
// C++17 without torch: the CUDA-only benchmarks include it too.
//
//   int64_t tokens = 48;
//   bool cpu = false;
//   hostfuse::cli::Flags flags("moe_example", "What the program does.");
//   flags.integer("--tokens", "T", &tokens, 1, 1 << 20, "tokens per rank");
//   flags.option("--cpu", &cpu, "CPU tensors even where there are GPUs");
//   if (const std::optional<int> status = flags.parse(argc, argv)) {
//     return *status;  // 0 after --help, 2 after a bad command line
//   }
//
// A flag's value follows it ("--tokens 8") or an "=" ("--tokens=8"). An
// integer is decimal digits with an optional "-", the whole argument ("12x"
// and " 12" are refused), within the flag's range. A flag given twice keeps
// its last value. Under a launcher, a rank other than 0 (RANK set and not 0)
// prints nothing, so that N ranks do not print the same text N times; every
// rank returns the same status.
#pragma once

#include <cctype>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace hostfuse::cli {

// The largest count a size flag takes where nothing tighter applies.
constexpr int64_t kMaxCount = std::numeric_limits<int32_t>::max();

// Decimal `text` as an integer in [min, max]; nullopt if `text` is not one
// (empty, other characters, out of range).
inline std::optional<int64_t> parseInteger(std::string_view text, int64_t min,
                                           int64_t max) {
  int64_t value = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const std::from_chars_result result = std::from_chars(first, last, value);
  if (text.empty() || result.ec != std::errc() || result.ptr != last ||
      value < min || value > max) {
    return std::nullopt;
  }
  return value;
}

// "from 1 to 8", ">= 1": the bounds of an integer flag, for messages.
inline std::string describeBounds(int64_t min, int64_t max) {
  if (max == std::numeric_limits<int64_t>::max()) {
    return ">= " + std::to_string(min);
  }
  return "from " + std::to_string(min) + " to " + std::to_string(max);
}

// The complaint of the MoE programs about a --topk over the number of
// experts, which the world size decides: for Flags::fail().
inline std::string topkExceedsExperts(int64_t topk, int64_t per_rank,
                                      int64_t ranks) {
  return "--topk " + std::to_string(topk) +
         " exceeds the number of experts: " + std::to_string(per_rank) +
         " per rank x " + std::to_string(ranks) +
         " rank(s) = " + std::to_string(per_rank * ranks);
}

class Flags {
 public:
  // `program` names the program in its messages; `about` says what it does
  // and how to run it, in the --help text: its lines ('\n') are wrapped at
  // 80 columns, except those that start with a space (commands, say).
  Flags(std::string program, std::string about)
      : program_(std::move(program)), about_(std::move(about)) {}

  // "--name METAVAR": an integer in [min, max] into `*value`. The --help
  // text shows `*value` as the default unless `default_text` says more
  // (a default that depends on the machine, say).
  template <typename Int>
  void integer(const char* name, const char* metavar, Int* value, int64_t min,
               int64_t max, const char* help,
               const char* default_text = nullptr) {
    static_assert(std::is_integral_v<Int> && sizeof(Int) <= sizeof(int64_t));
    Spec spec = makeSpec(Kind::kInteger, name, metavar, min, max, help,
                         default_text, std::to_string(*value));
    spec.store = [value](int64_t v) { *value = static_cast<Int>(v); };
    if (max > static_cast<int64_t>(std::numeric_limits<Int>::max()) ||
        min < static_cast<int64_t>(std::numeric_limits<Int>::min())) {
      std::abort();  // a programming error: the range must fit the type
    }
    specs_.push_back(std::move(spec));
  }

  // "--name A,B,...": one or more integers in [min, max], comma-separated;
  // replaces `*values`. The --help text shows `*values` as the default
  // unless `default_text` says more.
  void integerList(const char* name, const char* metavar,
                   std::vector<int64_t>* values, int64_t min, int64_t max,
                   const char* help, const char* default_text = nullptr) {
    std::string shown;
    for (const int64_t v : *values) {
      shown += (shown.empty() ? "" : ",") + std::to_string(v);
    }
    Spec spec = makeSpec(Kind::kIntegerList, name, metavar, min, max, help,
                         default_text, shown);
    spec.list = values;
    specs_.push_back(std::move(spec));
  }

  // "--name METAVAR": a non-empty string (a path, say) into `*value`.
  void text(const char* name, const char* metavar, std::string* value,
            const char* help, const char* default_text = nullptr) {
    Spec spec =
        makeSpec(Kind::kText, name, metavar, 0, 0, help, default_text, *value);
    spec.text = value;
    specs_.push_back(std::move(spec));
  }

  // "--name METAVAR": one of `choices` into `*value` (whose value before
  // parse() is the default).
  void choice(const char* name, const char* metavar, std::string* value,
              std::vector<std::string> choices, const char* help) {
    Spec spec =
        makeSpec(Kind::kChoice, name, metavar, 0, 0, help, nullptr, *value);
    spec.range = choiceRange(choices);
    spec.choice = value;
    spec.choices = std::move(choices);
    specs_.push_back(std::move(spec));
  }

  // "--name": sets `*value` to true; takes no value.
  void option(const char* name, bool* value, const char* help) {
    Spec spec = makeSpec(Kind::kOption, name, "", 0, 0, help, nullptr, "");
    spec.on = value;
    specs_.push_back(std::move(spec));
  }

  // Arguments that are not flags: integers in [min, max], any number of
  // them, appended to `*values` (which the program fills with its default
  // when none is given; `default_text` says what that is).
  void positionalIntegers(const char* metavar, std::vector<int64_t>* values,
                          int64_t min, int64_t max, const char* help,
                          const char* default_text) {
    positional_ = makeSpec(Kind::kIntegers, metavar, metavar, min, max, help,
                           default_text, "");
    positional_->list = values;
  }

  // At most one argument that is not a flag: one of `choices`, into
  // `*value` (whose value before parse() is the default).
  void positionalChoice(const char* metavar, std::string* value,
                        std::vector<std::string> choices, const char* help) {
    positional_ =
        makeSpec(Kind::kChoice, metavar, metavar, 0, 0, help, nullptr, *value);
    positional_->range = choiceRange(choices);
    positional_->choice = value;
    positional_->choices = std::move(choices);
  }

  // Parses the command line into the registered variables. nullopt: go
  // on. 0: --help was given and the usage text printed. 2: the command
  // line is bad; one line on stderr said why.
  std::optional<int> parse(int argc, char** argv) {
    given_.clear();
    bool positional_seen = false;
    for (int i = 1; i < argc; ++i) {
      const std::string_view arg = argv[i];
      if (arg == "-h" || arg == "--help") {
        if (loud()) {
          std::fputs(usage().c_str(), stdout);
        }
        return 0;
      }
      if (!isFlag(arg)) {
        if (!positional_ ||
            (positional_->kind == Kind::kChoice && positional_seen)) {
          return fail("unexpected argument '" + std::string(arg) + "'");
        }
        positional_seen = true;
        if (!take(*positional_, arg)) {
          return 2;
        }
        continue;
      }
      const size_t equals = arg.find('=');
      const std::string_view name = arg.substr(0, equals);
      const Spec* spec = find(name);
      if (spec == nullptr) {
        return fail("unknown flag '" + std::string(name) + "'");
      }
      given_.push_back(spec->name);
      if (spec->kind == Kind::kOption) {
        if (equals != std::string_view::npos) {
          return fail(spec->name + " takes no value, got '" + std::string(arg) +
                      "'");
        }
        *spec->on = true;
        continue;
      }
      std::string_view value;
      if (equals != std::string_view::npos) {
        value = arg.substr(equals + 1);
      } else if (i + 1 < argc &&
                 !(spec->kind == Kind::kText && isFlag(argv[i + 1]))) {
        // A text flag followed by a flag has no value ("--csv --tokens 4"):
        // "--csv=-x" gives one starting with "-".
        value = argv[++i];
      } else {
        return fail(spec->name + " needs a value: " + spec->range);
      }
      if (spec->kind == Kind::kIntegerList) {
        spec->list->clear();
      }
      if (!take(*spec, value)) {
        return 2;
      }
    }
    return std::nullopt;
  }

  // Whether the last parse() met flag `name` on the command line (for
  // checks of flags that only go with others).
  bool given(std::string_view name) const {
    for (const std::string& flag : given_) {
      if (flag == name) {
        return true;
      }
    }
    return false;
  }

  // Prints "<program>: <message>" as the one line of a bad command line
  // and returns 2, for checks that need more than one flag or the world
  // size: `return flags.fail("--topk 9 exceeds the 8 experts");`.
  int fail(const std::string& message) const {
    if (loud()) {
      std::fprintf(stderr, "%s: %s (see --help)\n", program_.c_str(),
                   message.c_str());
    }
    return 2;
  }

  std::string usage() const {
    // "usage: program [--a A] [--b]", wrapped at 80 columns under the
    // first "[".
    std::vector<std::string> items;
    for (const Spec& spec : specs_) {
      items.push_back("[" + spec.name +
                      (spec.kind == Kind::kOption ? "" : " " + spec.metavar) +
                      "]");
    }
    if (positional_) {
      items.push_back("[" + positional_->name +
                      (positional_->kind == Kind::kChoice ? "]" : " ...]"));
    }
    std::string text = "usage: " + program_;
    const size_t indent = text.size() + 1;
    size_t column = text.size();
    for (const std::string& item : items) {
      if (column + 1 + item.size() > 80 && column > indent) {
        text += "\n" + std::string(indent - 1, ' ');
        column = indent - 1;
      }
      text += " " + item;
      column += 1 + item.size();
    }
    text += "\n\n" + wrapLines(about_);
    if (positional_) {
      text += "\narguments:\n" + describe(*positional_);
    }
    text += "\nflags:\n";
    for (const Spec& spec : specs_) {
      text += describe(spec);
    }
    text += wrap("-h, --help", "print this text and exit");
    return text;
  }

 private:
  enum class Kind {
    kInteger,
    kIntegers,
    kIntegerList,
    kOption,
    kChoice,
    kText
  };

  struct Spec {
    Kind kind = Kind::kOption;
    std::string name;
    std::string metavar;
    int64_t min = 0;
    int64_t max = 0;
    std::string help;
    std::string range;       // what a value must be
    std::string default_to;  // the default, as shown
    std::function<void(int64_t)> store;
    std::vector<int64_t>* list = nullptr;
    bool* on = nullptr;
    std::string* choice = nullptr;
    std::string* text = nullptr;
    std::vector<std::string> choices;
  };

  static Spec makeSpec(Kind kind, const char* name, const char* metavar,
                       int64_t min, int64_t max, const char* help,
                       const char* default_text, std::string shown) {
    Spec spec;
    spec.kind = kind;
    spec.name = name;
    spec.metavar = metavar;
    spec.min = min;
    spec.max = max;
    spec.help = help;
    spec.range = kind == Kind::kIntegerList
                     ? "one or more comma-separated integers, each " +
                           describeBounds(min, max)
                 : kind == Kind::kText
                     ? "a non-empty string"
                     : "an integer " + describeBounds(min, max);
    spec.default_to = default_text != nullptr ? default_text : shown;
    return spec;
  }

  // "a", "a or b", "a, b or c".
  static std::string choiceRange(const std::vector<std::string>& choices) {
    std::string range;
    for (size_t i = 0; i < choices.size(); ++i) {
      range += (i == 0                    ? ""
                : i + 1 == choices.size() ? " or "
                                          : ", ") +
               choices[i];
    }
    return range;
  }

  // "-5" is a (negative) value, "--x" and "-x" are flags.
  static bool isFlag(std::string_view arg) {
    return arg.size() > 1 && arg[0] == '-' &&
           !std::isdigit(static_cast<unsigned char>(arg[1]));
  }

  static bool loud() {
    const char* rank = std::getenv("RANK");
    return rank == nullptr || *rank == '\0' || std::strcmp(rank, "0") == 0;
  }

  const Spec* find(std::string_view name) const {
    for (const Spec& spec : specs_) {
      if (spec.name == name) {
        return &spec;
      }
    }
    return nullptr;
  }

  // Stores `value` for `spec`; false (after the message) if it is invalid.
  bool take(const Spec& spec, std::string_view value) const {
    const std::string refusal = spec.name + " expects " + spec.range +
                                ", got '" + std::string(value) + "'";
    switch (spec.kind) {
      case Kind::kInteger:
      case Kind::kIntegers: {
        const std::optional<int64_t> v =
            parseInteger(value, spec.min, spec.max);
        if (!v) {
          fail(refusal);
          return false;
        }
        if (spec.kind == Kind::kInteger) {
          spec.store(*v);
        } else {
          spec.list->push_back(*v);
        }
        return true;
      }
      case Kind::kIntegerList: {
        // Each comma-separated item; an empty one ("1,,2", "1,") is bad.
        size_t start = 0;
        while (true) {
          const size_t comma = value.find(',', start);
          const std::optional<int64_t> v = parseInteger(
              value.substr(start, comma - start), spec.min, spec.max);
          if (!v) {
            fail(refusal);
            return false;
          }
          spec.list->push_back(*v);
          if (comma == std::string_view::npos) {
            return true;
          }
          start = comma + 1;
        }
      }
      case Kind::kChoice:
        for (const std::string& choice : spec.choices) {
          if (value == choice) {
            *spec.choice = choice;
            return true;
          }
        }
        fail(refusal);
        return false;
      case Kind::kText:
        if (value.empty()) {
          fail(refusal);
          return false;
        }
        *spec.text = std::string(value);
        return true;
      case Kind::kOption:
        break;
    }
    return false;
  }

  std::string describe(const Spec& spec) const {
    std::string left = spec.name;
    if (spec.kind != Kind::kOption && spec.metavar != spec.name) {
      left += " " + spec.metavar;
    }
    std::string right = spec.help;
    if (spec.kind != Kind::kOption) {
      right += " (" + spec.range;
      if (!spec.default_to.empty()) {
        right += "; default " + spec.default_to;
      }
      right += ")";
    }
    return wrap(left, right);
  }

  // "  LEFT          RIGHT", RIGHT word-wrapped at 80 columns under itself.
  static std::string wrap(const std::string& left, const std::string& right) {
    constexpr size_t kIndent = 26;
    std::string text = "  " + left;
    if (text.size() + 2 > kIndent) {
      text += "\n" + std::string(kIndent, ' ');
    } else {
      text += std::string(kIndent - text.size(), ' ');
    }
    return text + fill(right, kIndent) + "\n";
  }

  // Each line of `text` word-wrapped at 80 columns, but those that start
  // with a space as they are.
  static std::string wrapLines(const std::string& text) {
    std::string wrapped;
    size_t start = 0;
    while (start <= text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) {
        end = text.size();
      }
      const std::string line = text.substr(start, end - start);
      wrapped += (line.empty() || line[0] == ' ' ? line : fill(line, 0)) + "\n";
      start = end + 1;
    }
    return wrapped;
  }

  // `words` filled into lines of at most 80 columns, the first starting at
  // column `indent`, the others indented by `indent` spaces.
  static std::string fill(const std::string& words, size_t indent) {
    constexpr size_t kWidth = 80;
    std::string text;
    size_t column = indent;
    size_t start = 0;
    while (start < words.size()) {
      size_t end = words.find(' ', start);
      if (end == std::string::npos) {
        end = words.size();
      }
      const size_t length = end - start;
      if (column > indent && column + 1 + length > kWidth) {
        text += "\n" + std::string(indent, ' ');
        column = indent;
      } else if (column > indent) {
        text += " ";
        ++column;
      }
      text.append(words, start, length);
      column += length;
      start = end + 1;
    }
    return text;
  }

  std::string program_;
  std::string about_;
  std::vector<Spec> specs_;
  std::vector<std::string> given_;  // the flags parse() met, in order
  std::optional<Spec> positional_;
};

}  // namespace hostfuse::cli
