// Runs the MoeDispatch/MoeCombine nodes of a host program on the values of
// a run: what HostIrEvaluator::handle does for them. Picks the runtime of
// the node's backend (only the collective one exists so far).
#pragma once

#include "ir/evaluation.h"
#include "multidevice/communicator.h"
#include "multidevice/moe.h"

namespace hostfuse {

// Reads the inputs of `dispatch` from `values`, runs it on every rank, and
// binds its outputs and the symbolic extents they introduce (rows, L, R).
void evaluateMoeDispatch(const MoeDispatch& dispatch, ValueMap& values,
                         Communicator& communicator);

// Same for `combine`: binds `combined`.
void evaluateMoeCombine(const MoeCombine& combine, ValueMap& values,
                        Communicator& communicator);

}  // namespace hostfuse
