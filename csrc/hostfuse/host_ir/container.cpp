#include <hostfuse/host_ir/container.h>

#include <sstream>
#include <unordered_map>

#include <hostfuse/host_ir/host_ir.h>

namespace hostfuse {

std::string HostIrContainer::toString() const {
  // Fusions are printed once, after the program, numbered in order of first
  // use; a RunFusion line refers to its fusion by that number.
  std::vector<const Fusion*> fusions;
  std::unordered_map<const Fusion*, size_t> fusion_index;

  std::ostringstream ss;
  ss << "HostIrContainer {\n";
  for (const Val* input : inputs()) {
    ss << "  input " << input->toDeclString() << "\n";
  }
  for (const Expr* expr : top_level_exprs_) {
    ss << "  " << expr->toInlineString();
    if (const auto* run = dynamic_cast<const RunFusion*>(expr)) {
      auto [it, inserted] =
          fusion_index.emplace(&run->fusion(), fusions.size());
      if (inserted) {
        fusions.push_back(&run->fusion());
      }
      ss << "  # fusion " << it->second;
    }
    ss << "\n";
  }
  for (const Val* output : outputs()) {
    ss << "  output " << output->toDeclString() << "\n";
  }
  ss << "}\n";
  for (size_t i = 0; i < fusions.size(); ++i) {
    ss << "fusion " << i << ": " << fusions[i]->toString();
  }
  return ss.str();
}

std::unique_ptr<HostIrContainer> HostIrContainer::clone() const {
  auto copy = std::make_unique<HostIrContainer>();
  IrCloner cloner(copy.get());
  // Expressions are cloned in creation order, which rebuilds the copy's
  // top-level list in the same order.
  copyInto(copy.get(), cloner);
  return copy;
}

}  // namespace hostfuse
