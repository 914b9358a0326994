// Host backend: the CPU twin of CUDA VMM. Physical chunks are slices of one memfd (a chunk id
// is its offset / chunk_bytes), the reservation is a PROT_NONE anonymous mapping, and mapping a
// chunk is mmap(MAP_FIXED | MAP_SHARED) of its memfd slice, so a chunk mapped into two slots
// shows the same bytes in both, exactly like cuMemMap of one handle at two addresses.
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"

namespace jvt {
namespace {

// The host has no allocation granularity of its own; use the GPU's so every boundary case
// (tokens per chunk, chunk-sized shares) behaves the same in CI as on the device.
constexpr int64_t kHostGranularity = int64_t{2} << 20;

[[noreturn]] void throw_errno(const char* call) {
  throw std::runtime_error(std::string("host KV backend: ") + call + " failed: " +
                           std::strerror(errno));
}

class HostBackend final : public Backend {
 public:
  HostBackend() {
    fd_ = memfd_create("jvt-kv", MFD_CLOEXEC);
    if (fd_ < 0) throw_errno("memfd_create");
  }

  ~HostBackend() override {
    if (base_ != nullptr) munmap(base_, reserved_bytes_);
    close(fd_);
    for (int32_t* t : tables_) std::free(t);
  }

  int64_t granularity() const override { return kHostGranularity; }

  uint8_t* reserve(int64_t bytes, int64_t chunk_bytes) override {
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap(reserve)");
    base_ = static_cast<uint8_t*>(p);
    reserved_bytes_ = bytes;
    chunk_bytes_ = chunk_bytes;
    return base_;
  }

  // Growing the memfd is all creation takes; pages are committed on first touch and stay
  // in the file (and so in the pool) until the store is destroyed.
  void create_chunk(int64_t id) override {
    const int64_t end = (id + 1) * chunk_bytes_;
    if (end <= file_bytes_) return;
    if (ftruncate(fd_, end) != 0) throw_errno("ftruncate(memfd)");
    file_bytes_ = end;
  }

  void map(int64_t offset, const int64_t* ids, int64_t n) override {
    // One mmap per run of consecutive ids: fewer VMAs (vm.max_map_count) and syscalls.
    for (int64_t i = 0; i < n;) {
      int64_t j = i + 1;
      while (j < n && ids[j] == ids[j - 1] + 1) ++j;
      void* want = base_ + offset + i * chunk_bytes_;
      void* p = mmap(want, (j - i) * chunk_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                     fd_, ids[i] * chunk_bytes_);
      if (p == MAP_FAILED) throw_errno("mmap(map chunk)");
      i = j;
    }
  }

  void unmap(int64_t offset, int64_t n) override {
    // Replace the range by a fresh PROT_NONE reservation (munmap would leave a hole another
    // allocation could take).
    void* p = mmap(base_ + offset, n * chunk_bytes_, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap(unmap chunk)");
  }

  int32_t* alloc_shared_table(int64_t n, int32_t** device) override {
    auto* t = static_cast<int32_t*>(std::calloc(n, sizeof(int32_t)));
    if (t == nullptr) throw std::bad_alloc();
    tables_.push_back(t);
    *device = t;
    return t;
  }

  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

 private:
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  int64_t reserved_bytes_ = 0;
  int64_t chunk_bytes_ = 0;
  int64_t file_bytes_ = 0;
  std::vector<int32_t*> tables_;
};

}  // namespace

std::unique_ptr<Backend> make_host_backend() { return std::make_unique<HostBackend>(); }

}  // namespace jvt
