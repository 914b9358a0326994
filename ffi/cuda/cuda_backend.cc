// CUDA backend: VMM on the device's primary context (the one XLA uses). Driver entry points
// are resolved at run time through cudart's cudaGetDriverEntryPointByVersion, so the module
// links only cudart_static and imports where no libcuda exists; creating a store there raises
// "CUDA backend unavailable: ...".
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "kv_store.h"

namespace jvt {
namespace {

// The ABI version asked for: every function below has had its current signature since 12.0.
constexpr unsigned kDriverAbi = 12000;

struct Driver {
  decltype(&::cuGetErrorString) GetErrorString = nullptr;
  decltype(&::cuInit) Init = nullptr;
  decltype(&::cuDeviceGetCount) DeviceGetCount = nullptr;
  decltype(&::cuDeviceGet) DeviceGet = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) DevicePrimaryCtxRelease = nullptr;
  decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&::cuCtxSetCurrent) CtxSetCurrent = nullptr;
  decltype(&::cuMemGetAllocationGranularity) MemGetAllocationGranularity = nullptr;
  decltype(&::cuMemCreate) MemCreate = nullptr;
  decltype(&::cuMemRelease) MemRelease = nullptr;
  decltype(&::cuMemAddressReserve) MemAddressReserve = nullptr;
  decltype(&::cuMemAddressFree) MemAddressFree = nullptr;
  decltype(&::cuMemMap) MemMap = nullptr;
  decltype(&::cuMemUnmap) MemUnmap = nullptr;
  decltype(&::cuMemSetAccess) MemSetAccess = nullptr;
  decltype(&::cuMemGetInfo) MemGetInfo = nullptr;
  std::string error;  // why loading failed; empty when every entry point resolved
};

template <typename F>
bool resolve(const char* name, F* fn, std::string* error) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status{};
  const cudaError_t rc = cudaGetDriverEntryPointByVersion(name, &p, kDriverAbi, cudaEnableDefault,
                                                          &status);
  if (rc != cudaSuccess || status != cudaDriverEntryPointSuccess || p == nullptr) {
    *error = std::string("cannot resolve driver function ") + name + " (" +
             (rc != cudaSuccess ? cudaGetErrorString(rc) : "symbol not found in the driver") +
             ")";
    return false;
  }
  *fn = reinterpret_cast<F>(p);
  return true;
}

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    std::string& e = d.error;
    bool ok = resolve("cuGetErrorString", &d.GetErrorString, &e) &&
              resolve("cuInit", &d.Init, &e) &&
              resolve("cuDeviceGetCount", &d.DeviceGetCount, &e) &&
              resolve("cuDeviceGet", &d.DeviceGet, &e) &&
              resolve("cuDevicePrimaryCtxRetain", &d.DevicePrimaryCtxRetain, &e) &&
              resolve("cuDevicePrimaryCtxRelease", &d.DevicePrimaryCtxRelease, &e) &&
              resolve("cuCtxGetCurrent", &d.CtxGetCurrent, &e) &&
              resolve("cuCtxSetCurrent", &d.CtxSetCurrent, &e) &&
              resolve("cuMemGetAllocationGranularity", &d.MemGetAllocationGranularity, &e) &&
              resolve("cuMemCreate", &d.MemCreate, &e) &&
              resolve("cuMemRelease", &d.MemRelease, &e) &&
              resolve("cuMemAddressReserve", &d.MemAddressReserve, &e) &&
              resolve("cuMemAddressFree", &d.MemAddressFree, &e) &&
              resolve("cuMemMap", &d.MemMap, &e) &&
              resolve("cuMemUnmap", &d.MemUnmap, &e) &&
              resolve("cuMemSetAccess", &d.MemSetAccess, &e) &&
              resolve("cuMemGetInfo", &d.MemGetInfo, &e);
    if (ok) {
      const CUresult rc = d.Init(0);
      int count = 0;
      if (rc != CUDA_SUCCESS) {
        const char* s = nullptr;
        d.GetErrorString(rc, &s);
        e = std::string("cuInit failed: ") + (s ? s : "unknown error");
      } else if (d.DeviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
        e = "no CUDA device";
      }
    }
  });
  return d;
}

void check(CUresult rc, const char* call) {
  if (rc == CUDA_SUCCESS) return;
  const char* s = nullptr;
  driver().GetErrorString(rc, &s);
  throw std::runtime_error(std::string("CUDA KV backend: ") + call + " failed: " +
                           (s ? s : "unknown error") + " (CUresult " + std::to_string(rc) + ")");
}

void check(cudaError_t rc, const char* call) {
  if (rc == cudaSuccess) return;
  throw std::runtime_error(std::string("CUDA KV backend: ") + call +
                           " failed: " + cudaGetErrorString(rc));
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int32_t device) : d_(driver()), device_(device) {
    if (!d_.error.empty()) throw std::runtime_error("CUDA backend unavailable: " + d_.error);
    int count = 0;
    check(d_.DeviceGetCount(&count), "cuDeviceGetCount");
    if (device < 0 || device >= count)
      throw std::invalid_argument("device=cuda:" + std::to_string(device) +
                                  " out of range (this machine has " + std::to_string(count) +
                                  " CUDA devices)");
    check(d_.DeviceGet(&dev_, device), "cuDeviceGet");
    check(d_.DevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = device;
    access_.location = prop_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    size_t gran = 0;
    check(d_.MemGetAllocationGranularity(&gran, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          "cuMemGetAllocationGranularity");
    granularity_ = static_cast<int64_t>(gran);
  }

  ~CudaBackend() override {
    // Teardown must not throw; errors here (e.g. a driver already shut down at exit) are moot.
    bind_thread_nothrow();
    for (CUmemGenericAllocationHandle h : handles_)
      if (h != 0) d_.MemRelease(h);
    if (base_ != 0) d_.MemAddressFree(base_, reserved_bytes_);
    for (int32_t* t : tables_) cudaFreeHost(t);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    d_.DevicePrimaryCtxRelease(dev_);
  }

  int64_t granularity() const override { return granularity_; }

  void bind_thread() override {
    CUcontext cur = nullptr;
    check(d_.CtxGetCurrent(&cur), "cuCtxGetCurrent");
    if (cur != ctx_) check(d_.CtxSetCurrent(ctx_), "cuCtxSetCurrent");
  }

  uint8_t* reserve(int64_t bytes, int64_t chunk_bytes) override {
    bind_thread();
    check(d_.MemAddressReserve(&base_, bytes, granularity_, 0, 0), "cuMemAddressReserve");
    reserved_bytes_ = bytes;
    chunk_bytes_ = chunk_bytes;
    return reinterpret_cast<uint8_t*>(base_);
  }

  void create_chunk(int64_t id) override {
    bind_thread();
    if (static_cast<int64_t>(handles_.size()) <= id) handles_.resize(id + 1, 0);
    check(d_.MemCreate(&handles_[id], chunk_bytes_, &prop_, 0), "cuMemCreate");
  }

  void map(int64_t offset, const int64_t* ids, int64_t n) override {
    bind_thread();
    const CUdeviceptr start = base_ + offset;
    int64_t done = 0;
    try {
      for (; done < n; ++done)
        check(d_.MemMap(start + done * chunk_bytes_, chunk_bytes_, 0, handles_[ids[done]], 0),
              "cuMemMap");
      // One access call over the whole run: cuMemSetAccess dominates the cost of a mapping.
      check(d_.MemSetAccess(start, n * chunk_bytes_, &access_, 1), "cuMemSetAccess");
    } catch (...) {
      for (int64_t i = 0; i < done; ++i) d_.MemUnmap(start + i * chunk_bytes_, chunk_bytes_);
      throw;
    }
  }

  void unmap(int64_t offset, int64_t n) override {
    bind_thread();
    // One call per chunk: cuMemUnmap must cover exactly what one cuMemMap mapped.
    for (int64_t i = 0; i < n; ++i)
      check(d_.MemUnmap(base_ + offset + i * chunk_bytes_, chunk_bytes_), "cuMemUnmap");
  }

  int32_t* alloc_shared_table(int64_t n, int32_t** device) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    void* host = nullptr;
    check(cudaHostAlloc(&host, n * sizeof(int32_t), cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc");
    tables_.push_back(static_cast<int32_t*>(host));
    std::memset(host, 0, n * sizeof(int32_t));
    void* dev = nullptr;
    check(cudaHostGetDevicePointer(&dev, host, 0), "cudaHostGetDevicePointer");
    *device = static_cast<int32_t*>(dev);
    return static_cast<int32_t*>(host);
  }

  // Complete on return, in both directions. A plain cudaMemcpy is not: from pageable host
  // memory to the device it may return once the bytes are staged, before the DMA lands, and a
  // step XLA enqueues next on its own (non-blocking) stream would not wait for it. So the copy
  // runs on a stream of our own, created on first use (copies are serialised by the store's
  // map_mu), and the call synchronises that stream. Nothing orders it with XLA's stream: the
  // store's callers guarantee that no enqueued step touches the copied range meanwhile.
  void copy(void* dst, const void* src, size_t bytes) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    if (stream_ == nullptr)
      check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  void bind_thread_nothrow() {
    CUcontext cur = nullptr;
    if (d_.CtxGetCurrent(&cur) == CUDA_SUCCESS && cur != ctx_) d_.CtxSetCurrent(ctx_);
  }

  const Driver& d_;
  int32_t device_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  CUmemAllocationProp prop_ = {};
  CUmemAccessDesc access_ = {};
  int64_t granularity_ = 0;
  CUdeviceptr base_ = 0;
  int64_t reserved_bytes_ = 0;
  int64_t chunk_bytes_ = 0;
  std::vector<CUmemGenericAllocationHandle> handles_;  // by chunk id; 0 = not created
  std::vector<int32_t*> tables_;
  cudaStream_t stream_ = nullptr;  // copies (Backend::copy), created on first use
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int32_t device) {
  return std::make_unique<CudaBackend>(device);
}

void cuda_mem_info(int32_t device, int64_t* free_bytes, int64_t* total_bytes) {
  const Driver& d = driver();
  if (!d.error.empty()) throw std::runtime_error("CUDA backend unavailable: " + d.error);
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
  check(d.DeviceGet(&dev, device), "cuDeviceGet");
  check(d.DevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  size_t free = 0, total = 0;
  CUresult rc = d.CtxSetCurrent(ctx);
  if (rc == CUDA_SUCCESS) rc = d.MemGetInfo(&free, &total);
  d.DevicePrimaryCtxRelease(dev);
  check(rc, "cuMemGetInfo");
  *free_bytes = static_cast<int64_t>(free);
  *total_bytes = static_cast<int64_t>(total);
}

bool cuda_backend_available(std::string* why) {
  const Driver& d = driver();
  if (why != nullptr) *why = d.error;
  return d.error.empty();
}

}  // namespace jvt
