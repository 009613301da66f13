// A zeroed buffer without writing it: the KV pool (GBs) at start-up. Pages of a buffer this large come from a
// private anonymous mapping (the allocator mmaps every block this size), and madvise(MADV_DONTNEED) over them
// makes the kernel hand out zero-filled pages on first touch (Linux's documented behaviour for private
// anonymous memory): the pool costs nothing until the first steps write into it, where jnp.zeros writes every
// byte at start (~4 s for SmolLM2's 2.9 GB K pool here). The unaligned ends, and any range madvise refuses, are
// memset.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error LazyZeros(ffi::Result<ffi::AnyBuffer> out) {
  char* p = static_cast<char*>(out->untyped_data());
  const size_t n = out->size_bytes();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + n;
  const uintptr_t a = (begin + page - 1) / page * page, b = end / page * page;
  if (b <= a + page) {  // small: no whole page worth skipping
    std::memset(p, 0, n);
    return ffi::Error::Success();
  }
  std::memset(p, 0, a - begin);
  std::memset(reinterpret_cast<char*>(b), 0, end - b);
  if (madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED) != 0) std::memset(reinterpret_cast<char*>(a), 0, b - a);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveLazyZeros, LazyZeros, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
