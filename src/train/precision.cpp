// Training machinery of libtorch's that tch does not expose: autocast (bf16) on the CPU or CUDA,
// channels-last tensors, and the fused SGD update (tch 0.24 wraps no ops over tensor lists).
// Compiled with the c10d shim by build.rs.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstring>
#include <string>
#include <vector>

namespace {
at::DeviceType device_type(int cuda) { return cuda != 0 ? at::kCUDA : at::kCPU; }

int report(const std::exception& e, char* err, size_t len) {
  std::string m = e.what();
  if (err != nullptr && len > 0) {
    size_t n = std::min(len - 1, m.size());
    std::memcpy(err, m.data(), n);
    err[n] = '\0';
  }
  return 1;
}

std::vector<at::Tensor> list(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

extern "C" {

// Enters a bf16 autocast region for the CPU (cuda = 0) or CUDA; returns the previous state to
// give back to brelu_autocast_end (bit 0: enabled; the dtype above).
long brelu_autocast_begin(int cuda) {
  auto d = device_type(cuda);
  long prev = (at::autocast::is_autocast_enabled(d) ? 1 : 0) |
              (static_cast<long>(at::autocast::get_autocast_dtype(d)) << 1);
  at::autocast::set_autocast_enabled(d, true);
  at::autocast::set_autocast_dtype(d, at::kBFloat16);
  at::autocast::increment_nesting();
  return prev;
}

void brelu_autocast_end(int cuda, long prev) {
  auto d = device_type(cuda);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(d, (prev & 1) != 0);
  at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(prev >> 1));
}

// A 4-d tensor's data becomes channels-last in place (every handle to it sees the change, as
// `p.data = p.contiguous(memory_format=torch.channels_last)` does); other tensors are left.
int brelu_channels_last(at::Tensor* t, char* err, size_t len) {
  try {
    if (t->defined() && t->dim() == 4) t->set_data(t->contiguous(at::MemoryFormat::ChannelsLast));
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, len);
  }
}

// One SGD step over n parameters in one multi-tensor kernel (torch.optim.SGD(fused=True)):
// d = g + wd p; b = momentum b + d (b = d when first != 0); p -= lr b. With momentum 0, bufs is
// ignored and p -= lr d.
int brelu_fused_sgd(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs, size_t n,
                    double weight_decay, double momentum, double lr, int first, char* err,
                    size_t len) {
  try {
    at::NoGradGuard no_grad;
    auto b = momentum != 0.0 ? list(bufs, n) : std::vector<at::Tensor>{};
    at::_fused_sgd_(list(params, n), list(grads, n), b, weight_decay, momentum, lr,
                    /*dampening=*/0.0, /*nesterov=*/false, /*maximize=*/false, first != 0);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, len);
  }
}

}  // extern "C"
