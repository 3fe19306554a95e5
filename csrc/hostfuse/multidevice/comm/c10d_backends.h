// Construction of the c10d backends the Communicator uses: Gloo for CPU
// tensors, NCCL for CUDA tensors. Each lives in its own .cpp because each
// needs headers that nothing else in hostfuse should see (see
// cmake/HostfuseMultidevice.cmake).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace hostfuse {

// A Gloo backend of `size` ranks that rendezvous through `store`. With
// `loopback`, Gloo's transport binds to 127.0.0.1 (every rank on this host);
// otherwise it picks an interface as torch does (GLOO_SOCKET_IFNAME, or this
// host's name).
c10::intrusive_ptr<c10d::Backend> createGlooBackend(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
    std::chrono::milliseconds timeout, bool loopback);

// An NCCL backend of `size` ranks bound to `device`. Throws hostfuse::Error
// when hostfuse was built without nccl.h.
c10::intrusive_ptr<c10d::Backend> createNcclBackend(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
    std::chrono::milliseconds timeout, const at::Device& device);

// Whether this build can create NCCL backends.
bool isNcclBuilt();

}  // namespace hostfuse
