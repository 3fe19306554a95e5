#include <hostfuse/multidevice/comm/symmetric_memory.h>

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstring>
#include <iostream>
#include <map>
#include <mutex>

#include <hostfuse/multidevice/comm/peer_process.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/driver_api.h>

namespace hostfuse {

namespace {

// What a rank publishes about its buffer. (pid, start_time) names the
// process for the life of the host; peer_process.h says how a record is
// checked before its descriptor is taken.
struct HandleRecord {
  int32_t pid = 0;
  int32_t fd = -1;
  int32_t device = -1;
  int32_t reserved = 0;
  uint64_t mapped_bytes = 0;
  uint64_t start_time = 0;
  char host[64] = {};
};

std::vector<uint8_t> toBytes(const HandleRecord& record) {
  const auto* begin = reinterpret_cast<const uint8_t*>(&record);
  return std::vector<uint8_t>(begin, begin + sizeof(record));
}

HandleRecord fromBytes(const std::vector<uint8_t>& bytes,
                       const std::string& key) {
  HF_ERROR(bytes.size() == sizeof(HandleRecord), "store entry ", key, " has ",
           bytes.size(), " bytes, expected ", sizeof(HandleRecord));
  HandleRecord record;
  std::memcpy(&record, bytes.data(), sizeof(record));
  return record;
}

std::string hostName() {
  char name[64] = {};
  gethostname(name, sizeof(name) - 1);
  return name;
}

CUmemAllocationProp allocationProp(int device) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

// Reserves an address range, maps `handle` there and grants `device`
// read-write access.
void* mapHandle(CUmemGenericAllocationHandle handle, size_t bytes,
                size_t granularity, int device) {
  CUdeviceptr address = 0;
  HF_CU_CHECK(driver::cuMemAddressReserve(&address, bytes, granularity,
                                          CUdeviceptr{0}, 0ULL));
  try {
    HF_CU_CHECK(driver::cuMemMap(address, bytes, size_t{0}, handle, 0ULL));
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    HF_CU_CHECK(driver::cuMemSetAccess(address, bytes, &access, size_t{1}));
  } catch (...) {
    driver::cuMemUnmap(address, bytes);
    driver::cuMemAddressFree(address, bytes);
    throw;
  }
  return reinterpret_cast<void*>(address);
}

}  // namespace

std::string uniqueStorePrefix(const std::string& tag) {
  static std::mutex mutex;
  static std::map<std::string, int> uses;
  std::lock_guard<std::mutex> lock(mutex);
  return tag + "#" + std::to_string(uses[tag]++);
}

void storeBarrier(c10d::Store& store, const std::string& key, int world_size) {
  try {
    const int64_t arrived = store.add(key + "/arrived", 1);
    if (arrived == world_size) {
      store.set(key + "/done", std::vector<uint8_t>{1});
    }
    store.wait({key + "/done"});
  } catch (const std::exception& e) {
    HF_THROW("store barrier ", key, " over ", world_size,
             " ranks failed (a rank did not arrive?): ", e.what());
  }
}

SymmetricMemory::SymmetricMemory(int rank, int world_size, int device,
                                 size_t bytes, std::string tag)
    : rank_(rank),
      world_size_(world_size),
      device_(device),
      bytes_(bytes),
      tag_(std::move(tag)),
      handles_(world_size, 0),
      peer_ptrs_(world_size, nullptr) {}

std::shared_ptr<SymmetricMemory> SymmetricMemory::allocate(
    c10::intrusive_ptr<c10d::Store> store, int rank, int world_size, int device,
    size_t bytes, const std::string& tag) {
  HF_CHECK(store, "symmetric memory needs a store for the rendezvous");
  HF_CHECK(world_size >= 1 && rank >= 0 && rank < world_size,
           "symmetric memory: rank ", rank, " is outside [0, ", world_size,
           ")");
  HF_CHECK_GT(bytes, size_t{0}, "symmetric memory: empty buffer ", tag);
  const std::string prefix = uniqueStorePrefix(tag);
  // Read before anything is allocated: this may throw.
  const ProcessIdentity self = ownProcessIdentity();
  cuda::DeviceScope device_scope(device, /*for_driver_calls=*/true);

  CUdevice cu_device = 0;
  HF_CU_CHECK(driver::cuDeviceGet(&cu_device, device));
  int vmm = 0;
  int posix_fd = 0;
  HF_CU_CHECK(driver::cuDeviceGetAttribute(
      &vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
      cu_device));
  HF_CU_CHECK(driver::cuDeviceGetAttribute(
      &posix_fd,
      CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
      cu_device));
  HF_CHECK(vmm != 0 && posix_fd != 0, "symmetric memory: device ", device,
           " does not support CUDA virtual memory management with POSIX "
           "file-descriptor handles");

  const CUmemAllocationProp prop = allocationProp(device);
  size_t granularity = 0;
  HF_CU_CHECK(driver::cuMemGetAllocationGranularity(
      &granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
  const size_t mapped = roundUp(bytes, granularity);

  std::shared_ptr<SymmetricMemory> memory(
      new SymmetricMemory(rank, world_size, device, bytes, tag));
  memory->mapped_bytes_ = mapped;

  // 1. Allocate, map locally, zero, export.
  CUmemGenericAllocationHandle own = 0;
  HF_CU_CHECK(driver::cuMemCreate(&own, mapped, &prop, 0ULL));
  memory->handles_[rank] = own;
  memory->peer_ptrs_[rank] = mapHandle(own, mapped, granularity, device);
  HF_CUDA_CHECK(cudaMemset(memory->peer_ptrs_[rank], 0, mapped));
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  int own_fd = -1;
  HF_CU_CHECK(driver::cuMemExportToShareableHandle(
      &own_fd, own, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0ULL));

  HandleRecord record;
  record.pid = static_cast<int32_t>(self.pid);
  record.start_time = self.start_time;
  record.fd = own_fd;
  record.device = device;
  record.mapped_bytes = mapped;
  std::strncpy(record.host, hostName().c_str(), sizeof(record.host) - 1);
  try {
    const DescriptorKind own_kind = descriptorKind(own_fd);
    store->set(prefix + "/handle/" + std::to_string(rank), toBytes(record));

    // 2. Import and map every peer's buffer.
    for (int peer = 0; peer < world_size; ++peer) {
      if (peer == rank) {
        continue;
      }
      const std::string key = prefix + "/handle/" + std::to_string(peer);
      HandleRecord theirs;
      try {
        theirs = fromBytes(store->get(key), key);
      } catch (const c10::Error& e) {
        HF_THROW("symmetric memory ", tag, ": rank ", peer,
                 " did not publish its buffer (store key ", key,
                 "): ", e.what());
      }
      HF_CHECK(std::strncmp(theirs.host, record.host, sizeof(record.host)) == 0,
               "symmetric memory needs every rank on one node: rank ", peer,
               " is on ", theirs.host, ", rank ", rank, " on ", record.host);
      HF_CHECK_EQ(theirs.mapped_bytes, static_cast<uint64_t>(mapped),
                  "symmetric memory ", tag, ": rank ", peer,
                  " mapped a different size (every rank must ask for the "
                  "same bytes)");
      const int fd = takePeerDescriptor(
          PeerDescriptor{theirs.pid, theirs.start_time, theirs.fd}, self,
          own_kind, peer);
      CUmemGenericAllocationHandle imported = 0;
      const CUresult status = driver::cuMemImportFromShareableHandle(
          &imported, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
      close(fd);
      HF_CU_CHECK(status);
      memory->handles_[peer] = imported;
      memory->peer_ptrs_[peer] =
          mapHandle(imported, mapped, granularity, device);
    }

    // 3. Every rank has imported: the exported descriptors can go.
    storeBarrier(*store, prefix + "/mapped", world_size);
  } catch (...) {
    close(own_fd);
    throw;
  }
  close(own_fd);

  HF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&memory->device_peer_ptrs_),
                           sizeof(void*) * world_size));
  HF_CUDA_CHECK(cudaMemcpy(memory->device_peer_ptrs_, memory->peer_ptrs_.data(),
                           sizeof(void*) * world_size, cudaMemcpyHostToDevice));
  return memory;
}

void* SymmetricMemory::peerPtr(int rank) const {
  HF_CHECK(rank >= 0 && rank < world_size_, "symmetric memory ", tag_,
           ": rank ", rank, " is outside [0, ", world_size_, ")");
  return peer_ptrs_[rank];
}

SymmetricMemory::~SymmetricMemory() { release(); }

void SymmetricMemory::release() noexcept {
  // Nothing may still run on this device against the mappings.
  int previous = 0;
  const bool have_device = cudaGetDevice(&previous) == cudaSuccess;
  if (have_device) {
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
  }
  if (device_peer_ptrs_ != nullptr) {
    cudaFree(device_peer_ptrs_);
    device_peer_ptrs_ = nullptr;
  }
  try {
    for (int r = 0; r < world_size_; ++r) {
      if (peer_ptrs_[r] != nullptr) {
        const auto address = reinterpret_cast<CUdeviceptr>(peer_ptrs_[r]);
        driver::cuMemUnmap(address, mapped_bytes_);
        driver::cuMemAddressFree(address, mapped_bytes_);
        peer_ptrs_[r] = nullptr;
      }
      if (handles_[r] != 0) {
        driver::cuMemRelease(handles_[r]);
        handles_[r] = 0;
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "hostfuse: releasing symmetric memory " << tag_
              << " failed: " << e.what() << "\n";
  }
  if (have_device) {
    cudaSetDevice(previous);
  }
}

}  // namespace hostfuse
