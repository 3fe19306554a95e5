#include <hostfuse/utils/options.h>

#include <fmt/format.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iterator>

#include <hostfuse/utils/exceptions.h>

namespace hostfuse::options {

namespace {

constexpr Spec kSpecs[] = {
#define HF_OPTION_SPEC_(name, variable, type, default_text, min, max, doc) \
  {Option::name, variable, Type::type, default_text, min, max, doc},
    HOSTFUSE_OPTIONS(HF_OPTION_SPEC_)
#undef HF_OPTION_SPEC_
};

const char* typeName(Type type) {
  switch (type) {
    case Type::Bool:
      return "bool";
    case Type::Integer:
      return "integer";
    case Type::Number:
      return "number";
  }
  return "?";
}

// A bound as people write it: 300, 0.001, 1000000.
std::string boundText(double value) {
  if (value == std::floor(value) && std::fabs(value) < 1e16) {
    return fmt::format("{}", static_cast<int64_t>(value));
  }
  return fmt::format("{}", value);
}

std::string rangeText(const Spec& s) {
  if (s.type == Type::Bool) {
    return "0 or 1";
  }
  return fmt::format("[{}, {}]", boundText(s.min), boundText(s.max));
}

const Spec& typed(Option option, Type type) {
  const Spec& s = spec(option);
  HF_ERROR(s.type == type, s.variable, " is a ", typeName(s.type),
           " option, read as a ", typeName(type));
  return s;
}

void checkRange(const Spec& s, double value, const std::string& text) {
  HF_CHECK(value >= s.min && value <= s.max,
           fmt::format("environment variable {}={} is out of range: it must "
                       "be {} {} in {} ({})",
                       s.variable, text, s.type == Type::Integer ? "an" : "a",
                       typeName(s.type), rangeText(s), s.doc));
}

std::string lower(std::string text) {
  for (char& c : text) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return text;
}

}  // namespace

const Spec& spec(Option option) {
  const auto index = static_cast<size_t>(option);
  HF_ERROR(index < std::size(kSpecs) && kSpecs[index].option == option,
           "option table out of order at ", index);
  return kSpecs[index];
}

const Spec* begin() { return std::begin(kSpecs); }
const Spec* end() { return std::end(kSpecs); }

std::optional<std::string> environment(const char* variable) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0') {
    return std::nullopt;
  }
  return std::string(value);
}

int64_t parseInteger(const char* variable, const std::string& text) {
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  HF_CHECK(!text.empty() && end == text.c_str() + text.size() &&
               !std::isspace(static_cast<unsigned char>(text[0])) &&
               errno != ERANGE,
           "environment variable ", variable, "=", text,
           " is not an integer (decimal digits, optionally signed)");
  return static_cast<int64_t>(value);
}

double parseNumber(const char* variable, const std::string& text) {
  // Decimal notation only: strtod would also take hexadecimal ("0x10"),
  // "inf" and "nan".
  const bool decimal =
      text.find_first_not_of("0123456789.eE+-") == std::string::npos;
  errno = 0;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  HF_CHECK(decimal && !text.empty() && end == text.c_str() + text.size() &&
               errno != ERANGE && std::isfinite(value),
           "environment variable ", variable, "=", text,
           " is not a finite number");
  return value;
}

bool parseBool(const char* variable, const std::string& text) {
  const std::string value = lower(text);
  if (value == "1" || value == "true" || value == "on" || value == "yes") {
    return true;
  }
  if (value == "0" || value == "false" || value == "off" || value == "no") {
    return false;
  }
  HF_THROW("environment variable ", variable, "=", text,
           " is not a boolean: use 0 or 1 (also true/false, on/off, yes/no)");
}

std::optional<bool> getBool(Option option) {
  const Spec& s = typed(option, Type::Bool);
  const std::optional<std::string> text = environment(s.variable);
  if (!text) {
    return std::nullopt;
  }
  return parseBool(s.variable, *text);
}

std::optional<int64_t> getInt(Option option) {
  const Spec& s = typed(option, Type::Integer);
  const std::optional<std::string> text = environment(s.variable);
  if (!text) {
    return std::nullopt;
  }
  const int64_t value = parseInteger(s.variable, *text);
  checkRange(s, static_cast<double>(value), *text);
  return value;
}

std::optional<double> getNumber(Option option) {
  const Spec& s = typed(option, Type::Number);
  const std::optional<std::string> text = environment(s.variable);
  if (!text) {
    return std::nullopt;
  }
  const double value = parseNumber(s.variable, *text);
  checkRange(s, value, *text);
  return value;
}

void check(Option option) {
  switch (spec(option).type) {
    case Type::Bool:
      getBool(option);
      return;
    case Type::Integer:
      getInt(option);
      return;
    case Type::Number:
      getNumber(option);
      return;
  }
}

void checkTimeout(const char* what, double seconds) {
  HF_CHECK(seconds >= kMinTimeoutSeconds && seconds <= kMaxTimeoutSeconds,
           fmt::format("{} = {} s is out of range: a timeout must be a "
                       "number of seconds in [{}, {}]",
                       what, seconds, boundText(kMinTimeoutSeconds),
                       boundText(kMaxTimeoutSeconds)));
}

bool boolOr(Option option) {
  const Spec& s = typed(option, Type::Bool);
  HF_ERROR(*s.default_text != '\0', s.variable, " has no default");
  return getBool(option).value_or(parseBool(s.variable, s.default_text));
}

int64_t intOr(Option option) {
  const Spec& s = typed(option, Type::Integer);
  HF_ERROR(*s.default_text != '\0', s.variable, " has no default");
  return getInt(option).value_or(parseInteger(s.variable, s.default_text));
}

double numberOr(Option option) {
  const Spec& s = typed(option, Type::Number);
  HF_ERROR(*s.default_text != '\0', s.variable, " has no default");
  return getNumber(option).value_or(parseNumber(s.variable, s.default_text));
}

std::string markdownTable() {
  std::string table =
      "| variable | type | default | range | what it does |\n"
      "| --- | --- | --- | --- | --- |\n";
  for (const Spec* s = begin(); s != end(); ++s) {
    table += fmt::format("| `{}` | {} | {} | {} | {} |\n", s->variable,
                         typeName(s->type),
                         *s->default_text != '\0' ? s->default_text : "unset",
                         rangeText(*s), s->doc);
  }
  return table;
}

}  // namespace hostfuse::options
