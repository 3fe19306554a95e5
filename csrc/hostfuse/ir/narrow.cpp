#include <hostfuse/ir/narrow.h>

#include <ATen/ATen.h>

#include <vector>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/ops.h>

namespace hostfuse {

namespace {

// The slice's bounds against x's rank and, where known, its extent in dim:
// `who` names the builder or the node in the message.
void checkSlice(const std::string& who, const TensorView* x, int64_t dim,
                int64_t start, int64_t length) {
  HF_CHECK(dim >= 0 && dim < x->rank(), who, ": dim ", dim,
           " is out of range for ", x->toDeclString(), " of rank ", x->rank());
  HF_CHECK(start >= 0 && length >= 0, who, ": start ", start, " and length ",
           length, " must be >= 0");
  const std::optional<int64_t> size = x->extent(dim)->constantInt();
  // length <= size - start: start + length could overflow.
  HF_CHECK(!size.has_value() || (start <= *size && length <= *size - start),
           who, ": a slice of length ", length, " from ", start, " in dim ",
           dim, " does not fit ", x->toDeclString(), ", whose size there is ",
           size.value_or(0));
}

}  // namespace

Narrow::Narrow(TensorView* out, TensorView* x, int64_t dim, int64_t start,
               int64_t length) {
  addOutput(out);
  addInput(x);
  addDataAttribute(dim);
  addDataAttribute(start);
  addDataAttribute(length);
}

std::string Narrow::toInlineString() const {
  return out()->toString() + " = narrow(" + x()->toString() +
         ", dim=" + std::to_string(dim()) +
         ", start=" + std::to_string(start()) +
         ", length=" + std::to_string(length()) + ")";
}

void Narrow::validate() const {
  checkSlice("Narrow", x(), dim(), start(), length());
  HF_CHECK(out()->rank() == x()->rank() && out()->dtype() == x()->dtype(),
           "Narrow: out ", out()->toDeclString(),
           " must have the rank and dtype of x ", x()->toDeclString());
  const std::optional<int64_t> out_length = out()->extent(dim())->constantInt();
  HF_CHECK(out_length == length(), "Narrow: out ", out()->toDeclString(),
           " must have size ", length(), " in dim ", dim());
}

std::vector<c10::IValue> Narrow::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = inputs.at(0).toTensor();
  HF_CHECK(start() <= x.size(dim()) && length() <= x.size(dim()) - start(),
           toInlineString(), ": a slice of length ", length(), " from ",
           start(), " in dim ", dim(), " does not fit x of sizes ", x.sizes());
  return {x.narrow(dim(), start(), length())};
}

TensorView* narrow(TensorView* x, int64_t dim, int64_t start, int64_t length) {
  HF_CHECK(x != nullptr, "narrow: x is null");
  HF_CHECK(dim >= -x->rank() && dim < x->rank(), "narrow: dim ", dim,
           " is out of range for ", x->toDeclString(), " of rank ", x->rank());
  const int64_t d = dim < 0 ? dim + x->rank() : dim;
  checkSlice("narrow", x, d, start, length);
  std::vector<SizeSpec> sizes;
  for (int64_t i = 0; i < x->rank(); ++i) {
    sizes.emplace_back(i == d ? SizeSpec(length) : SizeSpec(x->extent(i)));
  }
  TensorView* out = makeTensor(sizes, x->dtype());
  IrBuilder::create<Narrow>(out, x, d, start, length);
  return out;
}

HF_DEFINE_EXPR(Narrow)

}  // namespace hostfuse
