// HostIrContainer: a host program.
//
// A program has inputs, outputs and a list of top-level expressions that the
// HostIrEvaluator runs in order: fusions (RunFusion), ops evaluated with ATen
// (matmul, linear, pointwise ops built with ir/ops.h), allocations, and, in
// later layers, communication. Every expression built in the container is
// appended to the list when it is created, so the list is in creation order,
// which is a valid execution order.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <hostfuse/ir/container.h>

namespace hostfuse {

class HostIrContainer : public Fusion {
 public:
  HostIrContainer() = default;

  const std::vector<Expr*>& topLevelExprs() const { return top_level_exprs_; }

  // The program as text: inputs, one line per top-level expression,
  // outputs, then every fusion it runs.
  std::string toString() const override;

  std::unique_ptr<HostIrContainer> clone() const;

 protected:
  void onExprRegistered(Expr* expr) override {
    top_level_exprs_.push_back(expr);
  }

 private:
  std::vector<Expr*> top_level_exprs_;
};

}  // namespace hostfuse
