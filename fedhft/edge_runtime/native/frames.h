// Length-prefixed binary frames over a pair of file descriptors (the native trainer's stdin/stdout).
//   request:  u32 op, u64 length, payload
//   response: u32 status (0 ok, 1 error), u64 length, payload (an error's payload is a UTF-8 message)
// All integers and floats are little-endian (both sides run on the same machine).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedhft {

enum Op : uint32_t {
  kHello = 1,      // i64 warm_batch, i64 warm_seq -> JSON info (runs one warm-up step, no update)
  kTrain = 2,      // i64 b, i64 s, i64 ids[b*s], i64 mask[b*s], i64 labels[b] -> f32 loss, i64 c, f32 logits[b*c]
  kEval = 3,       // same as kTrain, without the optimizer update
  kGetParams = 4,  // -> f32 of every parameter, in program order
  kSetParams = 5,  // u32 count, then count x (u32 index, u64 n, f32[n])
  kSetLr = 6,      // f64 lr
  kGetState = 7,   // -> i64 step, f32 m (all params), f32 v (all params)
  kSetState = 8,   // i64 step, f32 m, f32 v
  kQuit = 9,
};

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  template <typename T>
  T get() {
    T v;
    take(&v, sizeof(T));
    return v;
  }
  const uint8_t* take_bytes(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) throw std::runtime_error("truncated request payload");
    const uint8_t* q = p_;
    p_ += n;
    return q;
  }
  void take(void* dst, size_t n) { std::memcpy(dst, take_bytes(n), n); }
  bool done() const { return p_ == end_; }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

class Writer {
 public:
  template <typename T>
  void put(T v) {
    append(&v, sizeof(T));
  }
  void append(const void* src, size_t n) {
    const auto* b = static_cast<const uint8_t*>(src);
    buf_.insert(buf_.end(), b, b + n);
  }
  std::vector<uint8_t>& bytes() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

inline bool read_exact(int fd, void* dst, size_t n) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

inline void write_exact(int fd, const void* src, size_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w <= 0) throw std::runtime_error("cannot write to the parent process");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Reads one request; false on a clean end of input.
inline bool read_request(int fd, uint32_t* op, std::vector<uint8_t>* payload) {
  uint8_t head[12];
  if (!read_exact(fd, head, sizeof head)) return false;
  uint64_t len;
  std::memcpy(op, head, 4);
  std::memcpy(&len, head + 4, 8);
  if (len > (uint64_t{1} << 34)) throw std::runtime_error("request frame too large");
  payload->resize(len);
  if (len && !read_exact(fd, payload->data(), len)) throw std::runtime_error("truncated request frame");
  return true;
}

inline void write_response(int fd, uint32_t status, const void* data, size_t n) {
  uint8_t head[12];
  uint64_t len = n;
  std::memcpy(head, &status, 4);
  std::memcpy(head + 4, &len, 8);
  write_exact(fd, head, sizeof head);
  if (n) write_exact(fd, data, n);
}

}  // namespace fedhft
