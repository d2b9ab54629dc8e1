// conv2d's autograd kernel, in C++ so that a training step pays a few microseconds per
// convolution for autograd instead of the tens of microseconds of a Python formula (small layers
// are dominated by it). The formula is the one of every conv: the ReLU's mask from the saved
// output, then the gradient of the input (a transposed convolution), of the weight (a correlation
// of input and output gradient; weight sharing sums over every position) and of the bias (a sum),
// each only when needed. The residual's gradient is the output gradient itself.
//
// The backward ops keep their Python autograd formulas (pyconv/_registry.py): double backward
// calls them through the dispatcher when the backward itself is being differentiated.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace pyconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The operators, looked up once.
const auto& conv2d_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyconv::conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t, bool, const OptTensor&)>();
  return op;
}

const auto& backward_input_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyconv::conv2d_backward_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op;
}

const auto& backward_weight_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyconv::conv2d_backward_weight", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op;
}

const auto& backward_bias_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyconv::conv2d_backward_bias", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op;
}

const auto& relu_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyconv::relu_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

std::vector<int64_t> to_vec(const c10::IValue& v) { return v.toIntVector(); }

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool relu,
                            const OptTensor& residual) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out =
          conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, relu, residual);
    }
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["input_size"] = input.sizes();
    ctx->saved_data["weight_size"] = weight.sizes();
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_residual = residual.has_value() && residual->defined();
    // Indices of the differentiable inputs among the tensors that were passed.
    ctx->saved_data["bias_index"] = has_bias ? int64_t{2} : int64_t{-1};
    ctx->saved_data["residual_index"] = has_residual ? int64_t{has_bias ? 3 : 2} : int64_t{-1};
    ctx->save_for_backward({input, weight, relu ? out : at::Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const auto stride = to_vec(ctx->saved_data["stride"]);
    const auto padding = to_vec(ctx->saved_data["padding"]);
    const auto dilation = to_vec(ctx->saved_data["dilation"]);
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t bias_index = ctx->saved_data["bias_index"].toInt();
    const int64_t residual_index = ctx->saved_data["residual_index"].toInt();

    at::Tensor grad = grads[0];
    variable_list result(9);
    if (!grad.defined()) return result;
    // Differentiating the backward itself (create_graph) goes through the backward ops'
    // autograd formulas; otherwise straight to the kernels.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    if (ctx->saved_data["relu"].toBool()) grad = relu_backward_op().call(grad, saved[2]);
    if (ctx->needs_input_grad(0)) {
      result[0] = backward_input_op().call(grad, weight, to_vec(ctx->saved_data["input_size"]),
                                           stride, padding, dilation, groups);
    }
    if (ctx->needs_input_grad(1)) {
      result[1] = backward_weight_op().call(grad, input, to_vec(ctx->saved_data["weight_size"]),
                                            stride, padding, dilation, groups);
    }
    if (bias_index >= 0 && ctx->needs_input_grad(bias_index)) {
      result[2] = backward_bias_op().call(grad);
    }
    if (residual_index >= 0 && ctx->needs_input_grad(residual_index)) result[8] = grad;
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu,
                           const OptTensor& residual) {
  // Nothing to differentiate (inference, no_grad, frozen layers): straight to the kernel, without
  // the autograd node and its saved state (a few microseconds a call). Forward-mode AD tangents
  // still go to the node, which rejects them rather than drop them.
  const at::Tensor b = bias.value_or(at::Tensor()), r = residual.value_or(at::Tensor());
  const auto dual = [](const at::Tensor& t) { return t.defined() && t._fw_grad(0).defined(); };
  const auto grad = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  const bool needs_grad =
      at::GradMode::is_enabled() && (grad(input) || grad(weight) || grad(b) || grad(r));
  if (!needs_grad && !(dual(input) || dual(weight) || dual(b) || dual(r))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups, relu, residual);
  }
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups, relu,
                               residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, Autograd, m) { m.impl("conv2d", &conv2d_autograd); }

}  // namespace pyconv
