#include <hostfuse/multidevice/moe/backend.h>

#include <initializer_list>

#include <hostfuse/multidevice/moe/collective/runtime.h>
#include <hostfuse/multidevice/moe/cuda/runtime.h>
#include <hostfuse/utils/exceptions.h>

// A backend missing from the switch below must not compile, whatever the
// warning flags of the build.
#pragma GCC diagnostic error "-Wswitch"

namespace hostfuse {

namespace {

// The one switch over MoeBackend: no default, so that a new enumerator is a
// compile error here until its backend is named. nullptr for a value that is
// not an enumerator.
const MoeBackendInfo* findInfo(MoeBackend backend) {
  switch (backend) {
    case MoeBackend::Collective:
      return &collectiveMoeBackendInfo();
    case MoeBackend::Cuda:
      return &cudaMoeBackendInfo();
  }
  return nullptr;
}

// The value among `values` whose toString is `name`.
template <typename Enum, typename Values = std::initializer_list<Enum>>
std::optional<Enum> parseByName(std::string_view name, const Values& values) {
  for (const Enum value : values) {
    if (name == toString(value)) {
      return value;
    }
  }
  return std::nullopt;
}

}  // namespace

const MoeBackendInfo& moeBackendInfo(MoeBackend backend) {
  const MoeBackendInfo* info = findInfo(backend);
  HF_ERROR(info != nullptr, "MoeBackend ", static_cast<int>(backend),
           " is not a backend");
  HF_ERROR(info->backend == backend, "the info of MoeBackend ",
           static_cast<int>(backend), " describes another backend");
  return *info;
}

std::vector<MoeBackend> allMoeBackends() {
  std::vector<MoeBackend> backends;
  for (int i = 0; findInfo(static_cast<MoeBackend>(i)) != nullptr; ++i) {
    backends.push_back(static_cast<MoeBackend>(i));
  }
  return backends;
}

const char* toString(MoeBackend backend) {
  return moeBackendInfo(backend).name;
}

std::optional<MoeBackend> parseMoeBackend(std::string_view name) {
  return parseByName<MoeBackend>(name, allMoeBackends());
}

const char* toString(MoeDispatchQuant quantize) {
  switch (quantize) {
    case MoeDispatchQuant::None:
      return "none";
    case MoeDispatchQuant::Fp8E4M3:
      return "fp8_e4m3";
  }
  HF_ERROR(false, "MoeDispatchQuant ", static_cast<int>(quantize),
           " is not a mode");
  return "";
}

std::optional<MoeDispatchQuant> parseMoeDispatchQuant(std::string_view name) {
  return parseByName<MoeDispatchQuant>(
      name, {MoeDispatchQuant::None, MoeDispatchQuant::Fp8E4M3});
}

const char* toString(MoeCombineReduce reduce) {
  switch (reduce) {
    case MoeCombineReduce::PerPick:
      return "per_pick";
    case MoeCombineReduce::PerRank:
      return "per_rank";
  }
  HF_ERROR(false, "MoeCombineReduce ", static_cast<int>(reduce),
           " is not a mode");
  return "";
}

std::optional<MoeCombineReduce> parseMoeCombineReduce(std::string_view name) {
  return parseByName<MoeCombineReduce>(
      name, {MoeCombineReduce::PerPick, MoeCombineReduce::PerRank});
}

}  // namespace hostfuse
