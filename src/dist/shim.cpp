// The C ABI through which brelu reaches PyTorch's own distributed engine (c10d) inside the
// libtorch it links: a TCPStore rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, with
// all-reduce, broadcast and barrier on tensors. Every entry point catches C++ exceptions and
// reports them as text, so no exception crosses into Rust.
//
// Tensors arrive as `at::Tensor*`, which is what tch's `C_tensor` handles are.
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

}  // namespace

extern "C" {

// Joins the group: rank 0 serves the TCPStore at addr:port, the others connect to it; all
// wait up to timeout_ms for each other. nccl != 0 makes an NCCL group (CUDA builds only).
void* brelu_pg_new(const char* addr, int port, int rank, int world, long timeout_ms, int nccl,
                   char* err, size_t len) {
  Group* g = nullptr;
  int rc = guarded(err, len, [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = rank == 0;
    o.numWorkers = static_cast<std::size_t>(world);
    o.waitWorkers = true;
    o.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), o);
    auto group = std::make_unique<Group>();
    group->store = store;
    if (nccl != 0) {
#ifdef BRELU_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error("this build has no NCCL: rebuild brelu with --features cuda");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices = gloo_devices();
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    }
    g = group.release();
  });
  return rc == 0 ? g : nullptr;
}

void brelu_pg_free(void* g) { delete static_cast<Group*>(g); }

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

int brelu_pg_barrier(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Group*>(g)->backend->barrier()->wait(); });
}

}  // extern "C"
