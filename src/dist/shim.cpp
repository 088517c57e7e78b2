// The C ABI through which brelu reaches PyTorch's own distributed engine (c10d) inside the
// libtorch it links: a TCPStore rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, with
// all-reduce, broadcast and barrier on tensors. Every entry point catches C++ exceptions and
// reports them as text, so no exception crosses into Rust.
//
// Tensors arrive as `at::Tensor*`, which is what tch's `C_tensor` handles are.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef BRELU_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <gloo/config.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

// The headers are Debian's libgloo-dev (see scripts/setup.sh); libtorch 2.11 links gloo 0.5.x.
// The shim touches gloo only through `shared_ptr<gloo::transport::Device>`, so only the names
// (checked at link time) and this version have to agree.
static_assert(GLOO_VERSION_MAJOR == 0 && GLOO_VERSION_MINOR == 5,
              "gloo headers of another major/minor version than libtorch 2.11 links");

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  // The same backend behind c10d's dispatching front, which the Reducer talks to.
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (err == nullptr || len == 0) return;
  size_t n = std::min(len - 1, msg.size());
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}


std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices() {
  // As torch.distributed does: GLOO_SOCKET_IFNAME names the interfaces (comma-separated);
  // otherwise the address the host name resolves to.
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname != nullptr && *ifname != '\0') {
    std::stringstream ss(ifname);
    std::string name;
    while (std::getline(ss, name, ',')) {
      if (!name.empty()) devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
  }
  if (devices.empty()) devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return devices;
}

void allreduce_sum(Group* g, at::Tensor& t) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  g->backend->allreduce(v, o)->wait();
}

// Batch norm over the union of all ranks' batches, in training mode: the forward pass
// all-reduces the per-channel sums (and count), the backward pass the sums of dy and dy * xhat,
// so that with the gradients then averaged over the ranks, training equals one process running
// ordinary batch norm on the whole batch (as torch.nn.SyncBatchNorm does).
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias, int64_t group,
                            at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps) {
    auto* g = reinterpret_cast<Group*>(group);
    const int64_t c = x.size(1);
    const std::vector<int64_t> dims{0, 2, 3};
    // Each rank's per-channel mean and variance (Welford, in x's precision), combined over the
    // ranks in f64 as count-weighted sums: only 2C + 1 numbers travel and are widened. The
    // count stays a tensor, so nothing waits for the device. (libtorch 2.11 has no CPU kernels
    // for batch_norm_stats / batch_norm_gather_stats_with_counts, which torch.nn.SyncBatchNorm
    // uses on CUDA; this one path serves both devices.)
    const double n_local = static_cast<double>(x.numel() / c);
    auto [var_l, mean_l] = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    auto mean_d = mean_l.to(at::kDouble);
    auto stats = at::cat({mean_d * n_local, (var_l.to(at::kDouble) + mean_d * mean_d) * n_local,
                          at::full({1}, n_local, mean_d.options())});
    allreduce_sum(g, stats);
    auto count = stats.narrow(0, 2 * c, 1);
    auto mean = stats.narrow(0, 0, c) / count;
    auto var = (stats.narrow(0, c, c) / count - mean * mean).clamp_min(0.0);
    {
      at::NoGradGuard no_grad;
      auto unbias = count / (count - 1.0).clamp_min(1.0);
      running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1.0 - momentum)
          .add_((var * unbias).to(running_var.scalar_type()), momentum);
    }
    auto invstd = (var + eps).rsqrt();
    auto shape = std::vector<int64_t>{1, c, 1, 1};
    auto m = mean.to(x.scalar_type()).view(shape);
    auto is = invstd.to(x.scalar_type()).view(shape);
    auto xhat = (x - m) * is;
    ctx->save_for_backward({xhat, is, weight, count});
    ctx->saved_data["group"] = group;
    return xhat * weight.view(shape) + bias.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto xhat = saved[0], is = saved[1], weight = saved[2], count = saved[3];
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    auto dy = grads[0];
    const int64_t c = xhat.size(1);
    const std::vector<int64_t> dims{0, 2, 3};
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xhat = (dy * xhat).sum(dims);
    auto both = at::cat({sum_dy, sum_dy_xhat}).to(at::kDouble);
    allreduce_sum(g, both);
    auto shape = std::vector<int64_t>{1, c, 1, 1};
    auto mean_dy = (both.narrow(0, 0, c) / count).to(dy.scalar_type()).view(shape);
    auto mean_dy_xhat = (both.narrow(0, c, c) / count).to(dy.scalar_type()).view(shape);
    auto dx = weight.view(shape) * is * (dy - mean_dy - xhat * mean_dy_xhat);
    // The parameters' gradients are this rank's own; the ranks' gradients are averaged later.
    return {dx, sum_dy_xhat, sum_dy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// DDP's gradient compression as a communication hook: each bucket is cast to `dtype` (fp16 or
// bf16), divided by the world size first (so the sum cannot overflow), all-reduced, and cast
// back into the bucket, which the Reducer then copies to the gradients.
class CompressHook : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  CompressHook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, at::ScalarType dtype)
      : c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>>(pg), dtype_(dtype) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    auto narrow = bucket.getBufferRef().to(dtype_);
    narrow.div_(state_->getSize());
    std::vector<at::Tensor> v{narrow};
    auto fut = state_->allreduce(v)->getFuture();
    auto wide = bucket.getBufferRef();
    return fut->then(
        [wide](c10::ivalue::Future& done) {
          wide.copy_(done.value().toTensorVector().at(0));
          return c10::IValue(wide);
        },
        fut->elementType());
  }

 private:
  at::ScalarType dtype_;
};

// torch.nn.parallel.DistributedDataParallel's gradient engine for one model replica.
struct Ddp {
  std::unique_ptr<c10d::Reducer> reducer;
};

}  // namespace

extern "C" {

// Joins the group. Rank 0 serves the TCPStore at addr:port and the others connect to it, or,
// with agent_store != 0 (torchrun's TORCHELASTIC_USE_AGENT_STORE), every rank connects to the
// store torchrun's agent serves there. Keys live under `prefix` (torchrun: one per restart
// attempt, so a restarted group never reads a previous attempt's keys). The store waits up to
// init_timeout_ms for the ranks (connecting, rendezvous); collectives wait up to timeout_ms.
// nccl != 0 makes an NCCL group (CUDA builds only).
void* brelu_pg_new(const char* addr, int port, int rank, int world, long init_timeout_ms,
                   long timeout_ms, int nccl, int agent_store, const char* prefix, char* err,
                   size_t len) {
  Group* g = nullptr;
  int rc = guarded(err, len, [&] {
    std::chrono::milliseconds init_timeout(init_timeout_ms);
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = rank == 0 && agent_store == 0;
    o.numWorkers = agent_store == 0 ? std::optional<std::size_t>(world) : std::nullopt;
    o.waitWorkers = agent_store == 0;
    o.timeout = init_timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), o);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = std::make_unique<Group>();
    group->store = store;
    group->pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    if (nccl != 0) {
#ifdef BRELU_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
      group->pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL,
                            group->backend);
      group->pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
#else
      throw std::runtime_error("this build has no NCCL: rebuild brelu with --features cuda");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices = gloo_devices();
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
      group->pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO,
                            group->backend);
      group->pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    }
    g = group.release();
  });
  return rc == 0 ? g : nullptr;
}

void brelu_pg_free(void* g) { delete static_cast<Group*>(g); }

// Serves a TCPStore at port that no rank owns, as torchrun's agent does (the ranks then join
// with agent_store != 0). Returns the store (freed by brelu_store_free) or null with the error.
void* brelu_store_serve(int port, long timeout_ms, char* err, size_t len) {
  c10d::TCPStore* s = nullptr;
  guarded(err, len, [&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = true;
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    s = c10::make_intrusive<c10d::TCPStore>(std::string("127.0.0.1"), o).release();
  });
  return s;
}

void brelu_store_free(void* s) {
  c10::intrusive_ptr<c10d::TCPStore>::reclaim(static_cast<c10d::TCPStore*>(s));
}

// Sums a tensor elementwise over all ranks, in place. (c10d's tensor lists hold one tensor per
// local device, so brelu passes one.)
int brelu_pg_allreduce_sum(void* g, at::Tensor* t, char* err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(g)->backend->allreduce(v, o)->wait();
  });
}

// Copies root's tensor to every rank, in place.
int brelu_pg_broadcast(void* g, at::Tensor* t, int root, char* err, size_t len) {
  return guarded(err, len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group*>(g)->backend->broadcast(v, o)->wait();
  });
}

// Training-mode batch norm synchronised over the group (see SyncBatchNorm); returns a new
// tensor handle (owned by the caller, as tch's are) or null with the error in err.
at::Tensor* brelu_sync_batch_norm(void* g, at::Tensor* x, at::Tensor* weight, at::Tensor* bias,
                                  at::Tensor* running_mean, at::Tensor* running_var,
                                  double momentum, double eps, char* err, size_t len) {
  at::Tensor* out = nullptr;
  guarded(err, len, [&] {
    auto y = SyncBatchNorm::apply(*x, *weight, *bias, reinterpret_cast<int64_t>(g),
                                  *running_mean, *running_var, momentum, eps);
    out = new at::Tensor(std::move(y));
  });
  return out;
}

int brelu_pg_barrier(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Group*>(g)->backend->barrier()->wait(); });
}

// A c10d::Reducer over `n` parameters (in the order given, the same on every rank), as DDP
// builds it: buckets of at most bucket_bytes (the first of at most 1 MiB, so the first
// all-reduce starts early), every parameter expected to get a gradient, gradients kept as views into the
// buckets. compress: 0 none (sum, then divide by the world size), 1 fp16, 2 bf16. Returns the
// handle (freed by brelu_ddp_free) or null with the error.
void* brelu_ddp_new(void* g, at::Tensor** params, size_t n, long bucket_bytes, int compress,
                    char* err, size_t len) {
  Ddp* out = nullptr;
  guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    std::vector<at::Tensor> ps;
    std::unordered_map<size_t, std::string> names;
    for (size_t i = 0; i < n; ++i) ps.push_back(*params[i]);
    const long first = std::min<long>(c10d::kDefaultFirstBucketBytes, bucket_bytes);
    std::vector<size_t> caps{static_cast<size_t>(first), static_cast<size_t>(bucket_bytes)};
    // Reverse order, as DDP: gradients arrive roughly last layer first.
    std::vector<at::Tensor> rev(ps.rbegin(), ps.rend());
    std::vector<int64_t> idx;
    for (size_t i = 0; i < n; ++i) idx.push_back(static_cast<int64_t>(n - 1 - i));
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(rev, caps, {}, idx);
    std::vector<int64_t> cap_list(limits.begin(), limits.end());
    auto d = std::make_unique<Ddp>();
    d->reducer = std::make_unique<c10d::Reducer>(
        ps, buckets, group->pg, std::vector<bool>(n, false), bucket_bytes,
        /*find_unused_parameters=*/false, /*gradient_as_bucket_view=*/true, names,
        first, /*skip_all_reduce_unused_params=*/false,
        /*use_python_reducer=*/false, cap_list);
    if (compress != 0) {
      auto dtype = compress == 1 ? at::kHalf : at::kBFloat16;
      d->reducer->register_comm_hook(std::make_unique<CompressHook>(group->pg, dtype));
    }
    out = d.release();
  });
  return out;
}

void brelu_ddp_free(void* d) { delete static_cast<Ddp*>(d); }

// Arms the Reducer for the next backward pass: its gradients are all-reduced bucket by bucket
// while the pass runs, and averaged when it ends. A backward pass not armed accumulates locally
// (DDP's no_sync). The first call after an armed pass re-buckets in gradient order (a
// broadcast: every rank calls it at the same point).
int brelu_ddp_prepare(void* d, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto& r = *static_cast<Ddp*>(d)->reducer;
    r.rebuild_buckets();
    r.prepare_for_forward();
    r.prepare_for_backward({});
  });
}

}  // extern "C"
