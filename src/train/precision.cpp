// Mixed precision and memory format for training, from libtorch's own machinery: autocast
// (bf16) on the CPU or CUDA, and channels-last tensors. tch exposes autocast only for CUDA and
// in fp16, hence these few lines, compiled with the c10d shim by build.rs.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstring>
#include <string>

namespace {
at::DeviceType device_type(int cuda) { return cuda != 0 ? at::kCUDA : at::kCPU; }
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
    std::string m = e.what();
    if (len > 0) {
      size_t n = std::min(len - 1, m.size());
      std::memcpy(err, m.data(), n);
      err[n] = '\0';
    }
    return 1;
  }
}

}  // extern "C"
