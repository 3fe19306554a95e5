// hostfuse._C: the Python bindings, built with the pybind11 that ships with
// torch and torch's own casters, so tensors cross without copies and a
// torch.distributed process group arrives as the c10d::ProcessGroup it is.
//
// IR values (Scalar, TensorView) belong to their program: every binding that
// returns one keeps the Python objects it was made from alive (keep_alive),
// so a value can never outlive its program. Evaluators and graph runners run
// a clone of the program they are given, which stays editable.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/fp8_rows.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/narrow.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/ir/topk_softmax.h>
#include <hostfuse/kernel/codegen.h>
#include <hostfuse/kernel/compile.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/masking.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/multidevice/moe/runtime.h>
#include <hostfuse/utils/exceptions.h>

namespace py = pybind11;

namespace hostfuse {
namespace {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

DataType dataTypeOf(const py::object& dtype) {
  HF_CHECK(THPDtype_Check(dtype.ptr()), "dtype must be a torch.dtype, got ",
           std::string(py::str(py::type::of(dtype).attr("__name__"))));
  return toDataType(reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type);
}

py::object torchDtype(DataType dtype) {
  return py::reinterpret_borrow<py::object>(
      reinterpret_cast<PyObject*>(torch::getTHPDtype(toScalarType(dtype))));
}

MoeDispatchQuant quantizeOf(const std::string& name) {
  const std::optional<MoeDispatchQuant> quantize = parseMoeDispatchQuant(name);
  HF_CHECK(quantize.has_value(), "quantize must be 'none' or 'fp8_e4m3', got '",
           name, "'");
  return *quantize;
}

MoeCombineReduce reduceOf(const std::string& name) {
  const std::optional<MoeCombineReduce> reduce = parseMoeCombineReduce(name);
  HF_CHECK(reduce.has_value(), "reduce must be 'per_pick' or 'per_rank', got '",
           name, "'");
  return *reduce;
}

GroupedMatmulEpilogue epilogueOf(const std::string& name) {
  const std::optional<GroupedMatmulEpilogue> epilogue =
      parseGroupedMatmulEpilogue(name);
  HF_CHECK(epilogue.has_value(), "epilogue must be 'none' or 'silu_mul', got '",
           name, "'");
  return *epilogue;
}

MoeBackend backendOf(const std::string& name) {
  const std::optional<MoeBackend> backend = parseMoeBackend(name);
  HF_CHECK(
      backend.has_value(), "backend must be one of ",
      [] {
        std::string names;
        for (MoeBackend b : allMoeBackends()) {
          names +=
              (names.empty() ? "'" : ", '") + std::string(toString(b)) + "'";
        }
        return names;
      }(),
      ", got '", name, "'");
  return *backend;
}

// A size of define_tensor: an int, None (symbolic), or a Scalar.
SizeSpec sizeOf(const py::handle& size) {
  if (size.is_none()) {
    return SizeSpec(kSymbolic);
  }
  if (py::isinstance<Scalar>(size)) {
    return SizeSpec(size.cast<Scalar*>());
  }
  HF_CHECK(py::isinstance<py::int_>(size) && !py::isinstance<py::bool_>(size),
           "a size must be an int, None (symbolic) or a Scalar, got ",
           std::string(py::str(py::type::of(size).attr("__name__"))));
  return SizeSpec(size.cast<int64_t>());
}

// Inputs of run(): tensors, ints, floats and bools.
std::vector<c10::IValue> inputsOf(const py::sequence& inputs) {
  std::vector<c10::IValue> values;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const py::handle input = inputs[i];
    if (THPVariable_Check(input.ptr())) {
      values.emplace_back(THPVariable_Unpack(input.ptr()));
    } else if (py::isinstance<py::bool_>(input)) {
      values.emplace_back(input.cast<bool>());
    } else if (py::isinstance<py::int_>(input)) {
      values.emplace_back(input.cast<int64_t>());
    } else if (py::isinstance<py::float_>(input)) {
      values.emplace_back(input.cast<double>());
    } else {
      HF_THROW("input ", i,
               " must be a torch.Tensor, an int, a float or a bool, got ",
               std::string(py::str(py::type::of(input).attr("__name__"))));
    }
  }
  return values;
}

// A device argument as torch takes it: None, a torch.device, or a string
// such as "cuda:1".
std::optional<at::Device> deviceArg(const py::object& device) {
  if (device.is_none()) {
    return std::nullopt;
  }
  if (py::isinstance<py::str>(device)) {
    return at::Device(device.cast<std::string>());
  }
  return device.cast<at::Device>();
}

// The communicator of a run: the group's when one is given, else the
// process-wide one of the launcher's environment.
std::shared_ptr<Communicator> communicatorOf(
    const std::optional<ProcessGroupPtr>& group) {
  if (group.has_value() && *group) {
    return std::make_shared<Communicator>(*group);
  }
  return std::shared_ptr<Communicator>(&Communicator::getInstance(),
                                       [](Communicator*) {});
}

bool interpreterFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Destroys what `owners` hold (in order) without the GIL: tearing down
// waits for the device (a MoE kernel may wait for its peers up to its
// timeout) and shuts down backends, and other Python threads run
// meanwhile. While the interpreter finalizes, the GIL is kept (the members'
// own destructors do the work then).
template <typename... Owners>
void destroyWithoutGil(Owners&... owners) {
  if (PyGILState_Check() == 1 && !interpreterFinalizing()) {
    py::gil_scoped_release release;
    (owners.reset(), ...);
  }
}

// What HostIrEvaluator and GraphRunner share from Python: the communicator
// a run uses (the group's, or the launcher's), which must outlive `Runner`,
// and run() / check_status() without the GIL, so that ranks' threads and
// collectives are not serialized by it.
template <typename Runner>
class PyRunner {
 public:
  template <typename... Options>
  PyRunner(const HostIrContainer& program, std::optional<at::Device> device,
           const std::optional<ProcessGroupPtr>& group,
           std::optional<bool> mask_failed_ranks, Options&&... options)
      : communicator_(group.has_value() && *group
                          ? std::make_shared<Communicator>(*group)
                          : nullptr),
        // Without a group, the evaluator takes the launcher's communicator
        // when (and only if) a MoE node runs.
        runner_(std::make_unique<Runner>(
            program.clone(),
            paramsFor(device, communicator_.get(), mask_failed_ranks),
            std::forward<Options>(options)...)) {}
  ~PyRunner() { destroyWithoutGil(runner_, communicator_); }
  PyRunner(const PyRunner&) = delete;
  PyRunner& operator=(const PyRunner&) = delete;

  std::vector<at::Tensor> run(const py::sequence& inputs) {
    std::vector<c10::IValue> values = inputsOf(inputs);
    py::gil_scoped_release release;
    return runner_->run(values);
  }
  void checkStatus() {
    py::gil_scoped_release release;
    runner_->checkStatus();
  }
  // After hostfuse.moe.recover(): later MoE nodes run over the survivors.
  void resetCommunicator() {
    HF_CHECK(communicator_ == nullptr,
             "reset_communicator: this evaluator runs over a process group; "
             "make a new one over the survivors' group instead");
    runner_->resetCommunicator(nullptr);
  }
  std::vector<int64_t> maskedRanks() { return evaluator().maskedRanks(); }
  const Runner& runner() const { return *runner_; }

 private:
  static HostIrEvaluatorParams paramsFor(
      std::optional<at::Device> device, Communicator* communicator,
      std::optional<bool> mask_failed_ranks) {
    HostIrEvaluatorParams params;
    params.device = device;
    params.communicator = communicator;
    params.mask_failed_ranks = mask_failed_ranks;
    return params;
  }
  HostIrEvaluator& evaluator() {
    if constexpr (std::is_same_v<Runner, HostIrEvaluator>) {
      return *runner_;
    } else {
      return runner_->evaluator();
    }
  }

  std::shared_ptr<Communicator> communicator_;
  std::unique_ptr<Runner> runner_;
};

using PyEvaluator = PyRunner<HostIrEvaluator>;
using PyGraphRunner = PyRunner<GraphRunner>;

// The functional MoE API's state: one backend's runtime over one group.
// Sites (the cuda backend's workspaces) are named by the Python side.
class PyMoeRuntime {
 public:
  PyMoeRuntime(const std::string& backend,
               const std::optional<ProcessGroupPtr>& group,
               std::optional<bool> mask_failed_ranks)
      : backend_(backendOf(backend)),
        communicator_(communicatorOf(group)),
        runtime_(createMoeRuntime(backend_, *communicator_,
                                  maskFailedRanks(mask_failed_ranks))) {}

  ~PyMoeRuntime() { destroyWithoutGil(runtime_, communicator_); }
  PyMoeRuntime(const PyMoeRuntime&) = delete;
  PyMoeRuntime& operator=(const PyMoeRuntime&) = delete;

  py::dict dispatch(const std::string& site, const at::Tensor& x,
                    const at::Tensor& topk_idx,
                    const std::optional<at::Tensor>& topk_weights,
                    int64_t num_experts, int64_t capacity,
                    const std::string& quantize) {
    MoeDispatchArgs args;
    args.site = siteKey(site);
    args.describe_site = [site] { return "hostfuse.moe.dispatch " + site; };
    args.x = x;
    args.topk_idx = topk_idx;
    args.topk_weights = topk_weights;
    args.num_experts = num_experts;
    args.capacity = capacity;
    args.quantize = quantizeOf(quantize);
    MoeDispatchOutput out;
    {
      py::gil_scoped_release release;
      out = runtime_->dispatch(args);
    }
    py::dict fields;
    fields["recv_x"] = out.recv_x;
    fields["recv_scales"] =
        out.recv_scales.defined() ? py::cast(out.recv_scales) : py::none();
    fields["recv_weights"] =
        out.recv_weights.defined() ? py::cast(out.recv_weights) : py::none();
    fields["recv_src_rank"] = out.layout.src_rank;
    fields["recv_src_token"] = out.layout.src_token;
    fields["recv_src_k"] = out.layout.src_k;
    fields["recv_expert_counts"] = out.layout.expert_counts;
    fields["n_tokens_to_rank"] = out.layout.n_tokens_to_rank;
    fields["n_tokens_from_rank"] = out.layout.n_tokens_from_rank;
    fields["recv_layout_id"] = out.layout.id;
    return fields;
  }

  at::Tensor combine(const std::string& site, const at::Tensor& expert_out,
                     const py::dict& layout,
                     const std::optional<at::Tensor>& topk_weights,
                     int64_t num_tokens, int64_t num_experts,
                     const std::string& reduce,
                     const std::optional<at::Tensor>& recv_weights) {
    MoeCombineArgs args;
    args.dispatch_site = siteKey(site);
    args.expert_out = expert_out;
    args.layout.src_rank = layout["recv_src_rank"].cast<at::Tensor>();
    args.layout.src_token = layout["recv_src_token"].cast<at::Tensor>();
    args.layout.src_k = layout["recv_src_k"].cast<at::Tensor>();
    args.layout.expert_counts = layout["recv_expert_counts"].cast<at::Tensor>();
    args.layout.n_tokens_to_rank =
        layout["n_tokens_to_rank"].cast<at::Tensor>();
    args.layout.n_tokens_from_rank =
        layout["n_tokens_from_rank"].cast<at::Tensor>();
    args.layout.id = layout["recv_layout_id"].cast<at::Tensor>();
    args.reduce = reduceOf(reduce);
    args.topk_weights = topk_weights;
    args.recv_weights = recv_weights;
    args.num_tokens = num_tokens;
    args.num_experts = num_experts;
    py::gil_scoped_release release;
    return runtime_->combine(args);
  }

  void checkStatus() {
    py::gil_scoped_release release;
    runtime_->checkStatus();
  }

  void publishFailure(const at::Device& device) {
    py::gil_scoped_release release;
    runtime_->publishFailure(device);
  }
  int64_t rank() const { return communicator_->rank(); }
  int64_t size() const { return communicator_->size(); }
  std::string backend() const { return toString(backend_); }

 private:
  // A stable address per site name, which the runtime keys its state by.
  const void* siteKey(const std::string& site) {
    std::unique_ptr<std::string>& key = sites_[site];
    if (key == nullptr) {
      key = std::make_unique<std::string>(site);
    }
    return key.get();
  }

  MoeBackend backend_;
  std::shared_ptr<Communicator> communicator_;
  std::unique_ptr<MoeRuntime> runtime_;
  std::map<std::string, std::unique_ptr<std::string>> sites_;
};

// `values` as a list whose items keep `owner` (their program) alive.
py::list valuesOf(const std::vector<Val*>& values, const py::handle& owner) {
  py::list list;
  for (Val* value : values) {
    py::object item = py::cast(value, py::return_value_policy::reference);
    py::detail::keep_alive_impl(item, owner);
    list.append(item);
  }
  return list;
}

// `with program:` makes the program the active container of the builders.
std::vector<std::unique_ptr<FusionGuard>>& guards() {
  static std::vector<std::unique_ptr<FusionGuard>> stack;
  return stack;
}

template <typename Class>
void bindContainer(Class& cls) {
  cls.def("__enter__",
          [](py::object self) {
            guards().push_back(
                std::make_unique<FusionGuard>(self.cast<Fusion*>()));
            return self;
          })
      .def("__exit__",
           [](Fusion&, const py::args&) {
             HF_CHECK(!guards().empty(), "__exit__ without __enter__");
             guards().pop_back();
           })
      .def(
          "define_tensor",
          [](Fusion& self, const py::sequence& shape, const py::object& dtype,
             const std::string& name) {
            std::vector<SizeSpec> sizes;
            for (const py::handle size : shape) {
              sizes.push_back(sizeOf(size));
            }
            FusionGuard guard(&self);
            TensorView* tv = makeTensor(
                sizes, dtype.is_none() ? DataType::Float : dataTypeOf(dtype),
                name);
            self.addInput(tv);
            return tv;
          },
          py::arg("shape"), py::arg("dtype") = py::none(), py::arg("name") = "",
          py::keep_alive<0, 1>(), py::return_value_policy::reference,
          "A tensor input of this program: shape items are ints, None "
          "(symbolic) or Scalars (a shared symbolic extent).")
      .def(
          "define_scalar",
          [](Fusion& self, const std::string& name, const py::object& dtype) {
            FusionGuard guard(&self);
            return makeSymbolicScalar(
                dtype.is_none() ? DataType::Int64 : dataTypeOf(dtype), name);
          },
          py::arg("name") = "", py::arg("dtype") = py::none(),
          py::keep_alive<0, 1>(), py::return_value_policy::reference,
          "A symbolic scalar (an int64 extent unless dtype says otherwise); "
          "not an input by itself.")
      .def("add_input", &Fusion::addInput, py::arg("value"))
      .def("add_output", &Fusion::addOutput, py::arg("value"))
      .def_property_readonly("inputs",
                             [](py::object self) {
                               return valuesOf(self.cast<Fusion&>().inputs(),
                                               self);
                             })
      .def_property_readonly("outputs",
                             [](py::object self) {
                               return valuesOf(self.cast<Fusion&>().outputs(),
                                               self);
                             })
      .def("__str__", [](const Fusion& self) { return self.toString(); })
      .def("__repr__", [](const Fusion& self) { return self.toString(); });
}

}  // namespace
}  // namespace hostfuse

PYBIND11_MODULE(_C, m) {
  using namespace hostfuse;
  m.doc() = "hostfuse's C++ core; use the hostfuse package instead.";

  // Both translators are this module's own: the pybind11 internals are
  // shared with torch, whose exceptions must not pass through ours.
  py::register_local_exception<Error>(m, "Error", PyExc_RuntimeError);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) {
        std::rethrow_exception(p);
      }
    } catch (const InternalError& e) {
      py::set_error(
          PyExc_AssertionError,
          (std::string("hostfuse internal error: ") + e.what()).c_str());
    }
  });

  py::class_<Val, std::unique_ptr<Val, py::nodelete>>(m, "Val")
      .def_property_readonly("dtype",
                             [](const Val& v) { return torchDtype(v.dtype()); })
      .def_property_readonly("name", &Val::userName)
      .def("__str__", &Val::toString)
      .def("__repr__", &Val::toString);
  py::class_<Scalar, Val, std::unique_ptr<Scalar, py::nodelete>>(m, "Scalar")
      .def_property_readonly("is_constant", &Scalar::isConstant);
  py::class_<TensorView, Val, std::unique_ptr<TensorView, py::nodelete>>(
      m, "TensorView")
      .def_property_readonly("ndim", &TensorView::rank)
      .def("extent", &TensorView::extent, py::arg("dim"),
           py::keep_alive<0, 1>(), py::return_value_policy::reference)
      .def_property_readonly(
          "shape",
          [](const TensorView& tv) {
            py::list shape;
            for (Scalar* extent : tv.extents()) {
              const std::optional<int64_t> size = extent->constantInt();
              shape.append(size.has_value() ? py::cast(*size)
                                            : py::cast(extent->toString()));
            }
            return shape;
          },
          "Sizes: ints where constant, names where symbolic.");

  py::class_<Fusion, std::shared_ptr<Fusion>> fusion(
      m, "Fusion",
      "A fusion: pointwise math and reductions that compile to one CUDA "
      "kernel (NVRTC) on GPUs and run on ATen on the CPU.");
  fusion.def(py::init<>());
  bindContainer(fusion);
  py::class_<HostIrContainer, Fusion, std::shared_ptr<HostIrContainer>> program(
      m, "Program",
      "A host program: tensors, ops, fusions and MoE nodes, run by "
      "HostIrEvaluator or GraphRunner.");
  program.def(py::init<>());

  // Builders (in the active program: `with program:`).
  const auto ref = py::return_value_policy::reference;
#define HF_BIND_UNARY(name)                                      \
  m.def(#name, static_cast<TensorView* (*)(TensorView*)>(&name), \
        py::arg("x").none(false), py::keep_alive<0, 1>(), ref);
  HF_BIND_UNARY(neg)
  HF_BIND_UNARY(abs)
  HF_BIND_UNARY(relu)
  HF_BIND_UNARY(exp)
  HF_BIND_UNARY(log)
  HF_BIND_UNARY(sqrt)
  HF_BIND_UNARY(rsqrt)
  HF_BIND_UNARY(reciprocal)
  HF_BIND_UNARY(tanh)
  HF_BIND_UNARY(sigmoid)
  HF_BIND_UNARY(silu)
#undef HF_BIND_UNARY
#define HF_BIND_BINARY(name)                                                   \
  m.def(#name, py::overload_cast<Val*, Val*>(&name), py::arg("a").none(false), \
        py::arg("b").none(false), py::keep_alive<0, 1>(),                      \
        py::keep_alive<0, 2>(), ref);                                          \
  m.def(#name, py::overload_cast<TensorView*, double>(&name),                  \
        py::arg("a").none(false), py::arg("b").none(false),                    \
        py::keep_alive<0, 1>(), ref);                                          \
  m.def(#name, py::overload_cast<double, TensorView*>(&name),                  \
        py::arg("a").none(false), py::arg("b").none(false),                    \
        py::keep_alive<0, 2>(), ref);
  HF_BIND_BINARY(add)
  HF_BIND_BINARY(sub)
  HF_BIND_BINARY(mul)
  HF_BIND_BINARY(div)
  HF_BIND_BINARY(maximum)
  HF_BIND_BINARY(minimum)
  HF_BIND_BINARY(lt)
  HF_BIND_BINARY(le)
  HF_BIND_BINARY(gt)
  HF_BIND_BINARY(ge)
  HF_BIND_BINARY(eq)
  HF_BIND_BINARY(ne)
#undef HF_BIND_BINARY
  m.def("where", &where, py::arg("condition").none(false),
        py::arg("a").none(false), py::arg("b").none(false),
        py::keep_alive<0, 1>(), py::keep_alive<0, 2>(), py::keep_alive<0, 3>(),
        ref);
  m.def(
      "cast",
      [](TensorView* x, const py::object& dtype) {
        return cast(x, dataTypeOf(dtype));
      },
      py::arg("x").none(false), py::arg("dtype"), py::keep_alive<0, 1>(), ref);
  m.def("broadcast", &broadcast, py::arg("x").none(false),
        py::arg("is_broadcast_dim"), py::keep_alive<0, 1>(), ref);
  m.def("sum", &sum, py::arg("x").none(false), py::arg("dim"),
        py::arg("keep_dim") = false, py::keep_alive<0, 1>(), ref);
  m.def("max", &max, py::arg("x").none(false), py::arg("dim"),
        py::arg("keep_dim") = false, py::keep_alive<0, 1>(), ref);
  m.def("softmax", &softmax, py::arg("x").none(false), py::arg("dim"),
        py::keep_alive<0, 1>(), ref);
  m.def("matmul", &matmul, py::arg("a").none(false), py::arg("b").none(false),
        py::keep_alive<0, 1>(), py::keep_alive<0, 2>(), ref);
  m.def(
      "linear",
      [](TensorView* x, TensorView* weight, TensorView* bias,
         const py::object& out_dtype) {
        return linear(x, weight, bias,
                      out_dtype.is_none()
                          ? std::nullopt
                          : std::optional<DataType>(dataTypeOf(out_dtype)));
      },
      py::arg("x").none(false), py::arg("weight").none(false),
      py::arg("bias") = nullptr, py::arg("out_dtype") = py::none(),
      py::keep_alive<0, 1>(), py::keep_alive<0, 2>(), ref,
      "x @ weight.T (+ bias); out_dtype=torch.float32 with bf16 or f16 "
      "operands sums and returns the products in fp32.");
  m.def(
      "topk",
      [](const py::object& x, int64_t k) {
        HF_CHECK(!x.is_none(), "topk: x is None");
        const TopKResult r = topk(x.cast<TensorView*>(), k);
        const py::list both = valuesOf({r.values, r.indices}, x);
        return py::make_tuple(both[0], both[1]);
      },
      py::arg("x"), py::arg("k"),
      "(values, indices) of the k largest entries along the last dim.");
  m.def(
      "topk_softmax",
      [](const py::object& logits, int64_t k, bool renormalize) {
        HF_CHECK(!logits.is_none(), "topk_softmax: logits is None");
        const TopKSoftmaxResult r =
            topkSoftmax(logits.cast<TensorView*>(), k, renormalize);
        const py::list both = valuesOf({r.weights, r.indices}, logits);
        return py::make_tuple(both[0], both[1]);
      },
      py::arg("logits"), py::arg("k"), py::arg("renormalize") = true,
      "(weights, indices): the k largest of softmax(logits) along the last "
      "dim (f32 logits [T, E]), renormalized to sum to 1 unless "
      "renormalize=False; one kernel on GPUs.");
  m.def(
      "grouped_matmul",
      [](TensorView* x, TensorView* weights, TensorView* counts,
         TensorView* x_scales, const std::string& epilogue) {
        return groupedMatmul(x, weights, counts, x_scales,
                             epilogueOf(epilogue));
      },
      py::arg("x").none(false), py::arg("weights").none(false),
      py::arg("counts").none(false), py::arg("x_scales") = nullptr,
      py::kw_only(), py::arg("epilogue") = "none", py::keep_alive<0, 1>(),
      py::keep_alive<0, 2>(), ref,
      "One matmul per group of consecutive rows: rows [o_l, o_l + counts[l]) "
      "of x times weights[l] ([L, H, N]). epilogue='silu_mul' returns "
      "silu(gate) * up of the product's halves ([rows, N / 2]; in hostfuse's "
      "sm_90a grouped GEMM where it runs).");
  m.def(
      "dequantize_fp8",
      [](TensorView* x, TensorView* scales, const py::object& dtype,
         TensorView* row_counts) {
        return dequantizeFp8(x, scales, dataTypeOf(dtype), row_counts);
      },
      py::arg("x").none(false), py::arg("scales").none(false), py::arg("dtype"),
      py::kw_only(), py::arg("row_counts") = nullptr, py::keep_alive<0, 1>(),
      py::keep_alive<0, 2>(), ref,
      "fp8 e4m3 rows [rows, H] with their f32 scales [rows, H / B] (one per "
      "block of B channels) back to `dtype`: each product rounded to fp32, "
      "then to dtype; one kernel on GPUs for bf16, f16 and f32. Rows that "
      "several matmuls read are dequantized once this way. With row_counts "
      "(i64 [G], such as a dispatch's recv_expert_counts), the GPU kernel "
      "writes only the first sum(row_counts) rows; the rest is "
      "unspecified.");
  m.def("narrow", &narrow, py::arg("x").none(false), py::arg("dim"),
        py::arg("start"), py::arg("length"), py::keep_alive<0, 1>(), ref,
        "x's slice [start, start + length) along dim, as a view (torch's "
        "narrow): no copy. A program-level op: a fusion run on its result "
        "reads the view in place; inside a fusion, kernel codegen refuses "
        "it (such a fusion runs op by op on ATen, not as one kernel).");
  m.def(
      "run_fusion",
      [](const std::shared_ptr<Fusion>& fusion, const py::list& inputs,
         TensorView* row_counts) {
        HF_CHECK(dynamic_cast<HostIrContainer*>(fusion.get()) == nullptr,
                 "run_fusion: the fusion must be a hostfuse.Fusion, not a "
                 "Program");
        std::vector<Val*> values;
        for (const py::handle input : inputs) {
          HF_CHECK(!input.is_none(), "run_fusion: input ", values.size(),
                   " is None");
          values.push_back(input.cast<Val*>());
        }
        // The program keeps its own copy: later edits of `fusion` do not
        // change it.
        std::shared_ptr<Fusion> copy = fusion->clone();
        const std::vector<TensorView*> outputs =
            runFusion(std::move(copy), values, row_counts);
        return valuesOf(std::vector<Val*>(outputs.begin(), outputs.end()),
                        inputs.empty() ? py::handle(py::none()) : inputs[0]);
      },
      py::arg("fusion").none(false), py::arg("inputs"), py::kw_only(),
      py::arg("row_counts") = nullptr,
      "Runs `fusion` on `inputs` (values of the active program); returns its "
      "outputs as values of the program. With row_counts (an i64 [G] tensor "
      "value, such as a dispatch's recv_expert_counts), the GPU kernel "
      "computes only the first sum(row_counts) rows of its outputs (the "
      "rest is unspecified): pointwise fusions only.");

  py::class_<MoeDispatchResult>(m, "MoeDispatchResult")
      .def_readonly("recv_x", &MoeDispatchResult::recv_x)
      .def_readonly("recv_src_rank", &MoeDispatchResult::recv_src_rank)
      .def_readonly("recv_src_token", &MoeDispatchResult::recv_src_token)
      .def_readonly("recv_src_k", &MoeDispatchResult::recv_src_k)
      .def_readonly("recv_weights", &MoeDispatchResult::recv_weights)
      .def_readonly("recv_expert_counts",
                    &MoeDispatchResult::recv_expert_counts)
      .def_readonly("n_tokens_to_rank", &MoeDispatchResult::n_tokens_to_rank)
      .def_readonly("n_tokens_from_rank",
                    &MoeDispatchResult::n_tokens_from_rank)
      .def_readonly("recv_layout_id", &MoeDispatchResult::recv_layout_id)
      .def_readonly("recv_scales", &MoeDispatchResult::recv_scales);
  m.def(
      "moe_dispatch",
      [](TensorView* x, TensorView* topk_idx, TensorView* topk_weights,
         int64_t num_experts, const std::string& backend, int64_t capacity,
         const std::string& quantize) {
        return moeDispatch(x, topk_idx, topk_weights, num_experts,
                           backendOf(backend), capacity, quantizeOf(quantize));
      },
      py::arg("x").none(false), py::arg("topk_idx").none(false),
      py::arg("topk_weights") = nullptr, py::kw_only(), py::arg("num_experts"),
      py::arg("backend") = "collective", py::arg("capacity") = 0,
      py::arg("quantize") = "none", py::keep_alive<0, 1>());
  m.def(
      "moe_combine",
      [](TensorView* expert_out, const MoeDispatchResult& layout,
         TensorView* topk_weights, Scalar* num_tokens,
         const std::string& reduce) {
        return moeCombine(expert_out, layout, topk_weights, num_tokens,
                          reduceOf(reduce));
      },
      py::arg("expert_out").none(false), py::arg("layout").none(false),
      py::arg("topk_weights") = nullptr, py::kw_only(), py::arg("num_tokens"),
      py::arg("reduce") = "per_pick", py::keep_alive<0, 1>(), ref);

  py::class_<PyEvaluator>(m, "HostIrEvaluator")
      .def(py::init([](const HostIrContainer& program, const py::object& device,
                       const std::optional<ProcessGroupPtr>& group,
                       std::optional<bool> mask_failed_ranks) {
             return std::make_unique<PyEvaluator>(program, deviceArg(device),
                                                  group, mask_failed_ranks);
           }),
           py::arg("program"), py::kw_only(), py::arg("device") = py::none(),
           py::arg("group") = py::none(),
           py::arg("mask_failed_ranks") = py::none())
      .def("run", &PyEvaluator::run, py::arg("inputs"))
      .def("check_status", &PyEvaluator::checkStatus)
      .def("masked_ranks", &PyEvaluator::maskedRanks,
           "The first world's ranks whose experts are masked (those lost "
           "before recover(), with mask_failed_ranks on); else [].")
      .def("reset_communicator", &PyEvaluator::resetCommunicator,
           "After hostfuse.moe.recover(): drops the MoE state of the failed "
           "communicator; later MoE nodes run over the survivors.");
  py::class_<PyGraphRunner>(m, "GraphRunner")
      .def(
          py::init([](const HostIrContainer& program, bool copy_outputs,
                      std::vector<size_t> persistent_inputs,
                      const py::object& device,
                      const std::optional<ProcessGroupPtr>& group,
                      std::optional<bool> mask_failed_ranks) {
            return std::make_unique<PyGraphRunner>(
                program, deviceArg(device), group, mask_failed_ranks,
                GraphRunnerOptions{copy_outputs, std::move(persistent_inputs)});
          }),
          py::arg("program"), py::kw_only(), py::arg("copy_outputs") = false,
          py::arg("persistent_inputs") = std::vector<size_t>{},
          py::arg("device") = py::none(), py::arg("group") = py::none(),
          py::arg("mask_failed_ranks") = py::none())
      .def("run", &PyGraphRunner::run, py::arg("inputs"))
      .def("check_status", &PyGraphRunner::checkStatus)
      .def("masked_ranks", &PyGraphRunner::maskedRanks,
           "The first world's ranks whose experts are masked (those lost "
           "before recover(), with mask_failed_ranks on); else [].")
      .def_property_readonly(
          "num_graphs",
          [](const PyGraphRunner& r) { return r.runner().numGraphs(); })
      .def_property_readonly(
          "num_replays",
          [](const PyGraphRunner& r) { return r.runner().numReplays(); })
      .def_property_readonly("last_mode", [](const PyGraphRunner& r) {
        return std::string(toString(r.runner().lastMode()));
      });
  m.def(
      "find_capture_problems",
      [](const HostIrContainer& program, const py::object& device) {
        HF_CHECK(!device.is_none(),
                 "find_capture_problems: device must be a torch.device or a "
                 "string such as 'cuda:0', got None");
        return findCaptureProblems(program, *deviceArg(device));
      },
      py::arg("program"), py::arg("device"));

  m.def(
      "recover_world",
      [] {
        Communicator* survivors = nullptr;
        {
          py::gil_scoped_release release;
          survivors = &Communicator::recoverInstance();
        }
        return py::make_tuple(survivors->rank(), survivors->size(),
                              survivors->formerRanks());
      },
      "After a collective of the launcher's communicator failed: aborts it "
      "and makes the process-wide communicator one over the ranks still "
      "alive (Communicator::recoverInstance). Returns (rank, size, "
      "former_ranks).");

  m.def(
      "masked_ranks",
      [](std::optional<bool> mask_failed_ranks) {
        return maskFailedRanks(mask_failed_ranks)
                   ? failedRanks(Communicator::getInstance())
                   : std::vector<int64_t>{};
      },
      py::arg("mask_failed_ranks") = py::none(),
      "The launcher's first-world ranks that the functional MoE API masks: "
      "those lost before recover_world(), when masking is on; else [].");

  py::class_<PyMoeRuntime>(m, "MoeRuntime")
      .def(py::init<const std::string&, const std::optional<ProcessGroupPtr>&,
                    std::optional<bool>>(),
           py::arg("backend"), py::arg("group") = py::none(),
           py::arg("mask_failed_ranks") = py::none())
      .def("dispatch", &PyMoeRuntime::dispatch, py::arg("site"), py::arg("x"),
           py::arg("topk_idx"), py::arg("topk_weights"), py::arg("num_experts"),
           py::arg("capacity"), py::arg("quantize") = "none")
      .def("combine", &PyMoeRuntime::combine, py::arg("site"),
           py::arg("expert_out"), py::arg("layout"), py::arg("topk_weights"),
           py::arg("num_tokens"), py::arg("num_experts"),
           py::arg("reduce") = "per_pick", py::arg("recv_weights") = py::none())
      .def("check_status", &PyMoeRuntime::checkStatus)
      .def("publish_failure", &PyMoeRuntime::publishFailure, py::arg("device"))
      .def_property_readonly("rank", &PyMoeRuntime::rank)
      .def_property_readonly("size", &PyMoeRuntime::size)
      .def_property_readonly("backend", &PyMoeRuntime::backend);
  m.def(
      "grouped_matmul_on_tensors",
      [](const at::Tensor& x, const at::Tensor& weights,
         const at::Tensor& counts, const std::optional<at::Tensor>& x_scales,
         const std::string& epilogue) {
        const GroupedMatmulEpilogue parsed = epilogueOf(epilogue);
        py::gil_scoped_release release;
        return groupedMatmulOnTensors(x, weights, counts,
                                      x_scales.value_or(at::Tensor()), parsed);
      },
      py::arg("x"), py::arg("weights"), py::arg("counts"), py::arg("x_scales"),
      py::arg("epilogue"));
  m.def("moe_backends", [] {
    std::vector<std::string> names;
    for (MoeBackend b : allMoeBackends()) {
      names.emplace_back(toString(b));
    }
    return names;
  });

  m.def(
      "cuda_source",
      [](const Fusion& fusion, bool contiguous, int64_t vector_width,
         bool index32, bool pitched_rows, bool row_limited) {
        InputSignature signature;
        signature.contiguous = contiguous;
        signature.vector_width = vector_width;
        signature.index32 = index32;
        signature.pitched_rows = pitched_rows;
        signature.row_limited = row_limited;
        return generateCudaSource(fusion, signature);
      },
      py::arg("fusion"), py::kw_only(), py::arg("contiguous") = false,
      py::arg("vector_width") = 1, py::arg("index32") = false,
      py::arg("pitched_rows") = false, py::arg("row_limited") = false);
  m.def(
      "compile_cuda",
      [](const std::string& source, int arch, bool cubin) {
        CompileTarget target;
        target.arch = arch;
        target.cubin = cubin;
        CompiledBinary binary;
        {
          py::gil_scoped_release release;
          binary = compileCudaSource(source, target);
        }
        py::dict result;
        result["target"] = binary.target.toString();
        result["image"] = py::bytes(binary.image);
        result["log"] = binary.log;
        return result;
      },
      py::arg("source"), py::kw_only(), py::arg("arch") = 90,
      py::arg("cubin") = false);
}
